"""Numerical faults: NaN / inf in an update's inputs, loss or gradients skips the update, warns with what and where,
and stops the run after max_nonfinite_steps in a row; no NaN reaches the weights or a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from test_ppo import make_trainer

import tether.trainers.ppo as ppo_module
from tether.numerics import NonFiniteGuard, NumericalError, nonfinite_inputs


def test_nonfinite_inputs_names_the_tensor_and_rows_inside_the_mask_only():
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    adv = torch.zeros(3, 3)
    adv[0, 2] = math.nan  # outside the mask: padding may hold anything
    assert nonfinite_inputs({"advantages": adv, "values": None}, mask) == []
    adv[1, 0], adv[2, 1] = math.inf, math.nan
    assert nonfinite_inputs({"advantages": adv}, mask) == ["advantages: 2 NaN/inf values in rows [1, 2]"]
    per_row = torch.tensor([0.0, -math.inf, 1.0])  # [B] tensors count in every row
    assert nonfinite_inputs({"scores": per_row}, mask) == ["scores: 1 NaN/inf values in rows [1]"]


def test_the_guard_counts_steps_in_a_row_and_stops_with_advice(capsys):
    guard = NonFiniteGuard(limit=2)
    guard.after_step(1, ["NaN/inf loss in epoch 1, mini-batch 1"])
    guard.after_step(2, [])  # a clean step resets the count
    guard.after_step(3, ["advantages: 1 NaN/inf values in rows [4]"])
    with pytest.raises(NumericalError, match=r"2 steps in a row .*step 3: advantages.*step 4: NaN/inf gradient"):
        guard.after_step(4, ["NaN/inf gradient in epoch 1, mini-batch 2"])
    assert "warning: step 3: skipped an update: advantages" in capsys.readouterr().err
    never = NonFiniteGuard(limit=0)
    for step in range(10):
        never.after_step(step, ["NaN/inf loss"])


def nan_loss_at(trainer, steps: set[int]) -> None:
    """Make the policy loss NaN in the updates of the given steps (1-based)."""
    real = trainer.micro_batch_loss

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return (loss * math.nan if trainer.state.step + 1 in steps else loss), stats

    trainer.micro_batch_loss = poisoned


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_a_nan_loss_skips_that_update_and_training_goes_on(tmp_path, capsys):
    trainer = make_trainer(tmp_path / "run", steps=3)
    nan_loss_at(trainer, {2})
    seen = []
    real_record = ppo_module.record_step
    ppo_module.record_step = lambda *a, **k: seen.append(weights(trainer)) or real_record(*a, **k)
    try:
        history = trainer.train()
    finally:
        ppo_module.record_step = real_record
    assert [row["numerics/skipped_updates"] for row in history] == [0.0, 4.0, 0.0]  # 2 epochs x 2 mini-batches
    assert all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])  # step 2 changed nothing
    assert any(not torch.equal(seen[1][k], seen[2][k]) for k in seen[1])  # step 3 trained again
    assert all(torch.isfinite(v).all() for v in seen[2].values())
    assert "warning: step 2: skipped an update: NaN/inf loss in epoch 1, mini-batch 1" in capsys.readouterr().err


def test_nan_advantages_skip_the_update_before_any_forward(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path / "run", steps=2)
    calls = []
    real_update = trainer.update
    trainer.update = lambda *a, **k: calls.append(1) or real_update(*a, **k)
    real_gae = ppo_module.gae

    def gae_with_a_nan(*args, **kwargs):
        advantages, returns = real_gae(*args, **kwargs)
        if len(calls) == 1:  # the second step's advantages
            advantages = advantages.clone()
            advantages[3, 0] = math.nan
        return advantages, returns

    monkeypatch.setattr(ppo_module, "gae", gae_with_a_nan)
    history = trainer.train()
    assert len(calls) == 1 and history[1]["numerics/skipped_updates"] == 4.0


def test_persistent_nans_stop_the_run_and_never_reach_a_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from tether.checkpoint import list_checkpoints

    trainer = make_trainer(tmp_path / "run", steps=5, max_nonfinite_steps=2,
                           logging=__import__("tether").LoggingConfig(report_to=["jsonl"], progress_bar=False,
                                                                      save_steps=1, report=False))
    nan_loss_at(trainer, {2, 3, 4, 5})
    with pytest.raises(NumericalError, match="2 steps in a row had NaN/inf values"):
        trainer.train()
    assert trainer.state.step == 3  # stopped after the second bad step in a row
    for ckpt in list_checkpoints(trainer.run_dir):
        model = AutoModelForCausalLM.from_pretrained(ckpt / "policy")
        assert all(torch.isfinite(p).all() for p in model.parameters()), ckpt


def test_the_reward_model_trainer_skips_a_nan_step_and_stops_after_too_many(tmp_path, monkeypatch):
    from test_reward_trainer import resumable_trainer

    import tether.trainers.reward as reward_module

    trainer = resumable_trainer(tmp_path, "skip")
    real = reward_module.RewardTrainer._gradients

    def nan_grads_at(bad_steps):
        def gradients(self, batch):
            stats = real(self, batch)
            if self.state.step + 1 in bad_steps:
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.fill_(math.nan)
            return stats
        return gradients

    monkeypatch.setattr(reward_module.RewardTrainer, "_gradients", nan_grads_at({2}))
    history = trainer.train()
    assert math.isnan(history[1]["train/grad_norm"]) and math.isfinite(history[2]["train/grad_norm"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    monkeypatch.setattr(reward_module.RewardTrainer, "_gradients", nan_grads_at({2, 3, 4, 5, 6}))
    trainer = resumable_trainer(tmp_path, "stop")
    with pytest.raises(NumericalError, match="3 steps in a row"):
        trainer.train()
    assert trainer.state.step == 4
