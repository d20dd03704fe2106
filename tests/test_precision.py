"""mixed_precision and gradient_checkpointing are settings that take effect (each proven on, not just accepted)."""

from __future__ import annotations

import pytest
import torch

import tether
from tether.toy import CharFractionReward, make_toy_model, make_toy_prompts, make_toy_tokenizer


def make(tmp_path, trainer: str, **overrides):
    tok = make_toy_tokenizer()
    logging = tether.LoggingConfig(report_to=["jsonl"], progress_bar=False, save_steps=0, report=False)
    common = dict(output_dir=str(tmp_path), seed=0, learning_rate=1e-3, logging=logging, device="cpu",
                  sampling=tether.SamplingConfig(max_new_tokens=6), **overrides)
    if trainer == "ppo":
        cfg = tether.PPOConfig(total_episodes=8, rollout_batch_size=8, mini_batch_size=8, micro_batch_size=4,
                               ppo_epochs=1, **common)
        cls = tether.PPOTrainer
    else:
        cfg = tether.GRPOConfig(total_episodes=4, rollout_batch_size=4, num_generations=2, mini_batch_size=8,
                                micro_batch_size=4, **common)
        cls = tether.GRPOTrainer
    return cls(cfg, policy=make_toy_model(tok), tokenizer=tok, reward=CharFractionReward(),
               prompts=make_toy_prompts(16))


def record_head_dtypes(trainer) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    trainer.policy.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("trainer_name", ["ppo", "grpo"])
def test_bf16_autocast_runs_the_forwards_in_bfloat16(tmp_path, trainer_name):
    off = make(tmp_path / "off", trainer_name)
    seen_off = record_head_dtypes(off)
    off.train()
    assert seen_off and set(seen_off) == {torch.float32}
    on = make(tmp_path / "on", trainer_name, mixed_precision="bf16")
    seen_on = record_head_dtypes(on)
    (row,) = on.train()
    # generation runs in float32 (its logprobs are the agreement check); every rollout and update forward in bf16
    assert torch.bfloat16 in seen_on
    assert all(p.dtype == torch.float32 for p in on.policy.parameters())  # weights stay float32
    assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if isinstance(v, float))
    # bf16 forwards no longer reproduce generate()'s float32 logprobs exactly: the agreement metric shows it
    assert row["rollout/logprob_diff_max"] > 1e-4


@pytest.mark.parametrize("trainer_name", ["ppo", "grpo"])
def test_gradient_checkpointing_recomputes_the_blocks_and_changes_nothing_else(tmp_path, trainer_name):
    results = {}
    for flag in (False, True):
        trainer = make(tmp_path / str(flag), trainer_name, gradient_checkpointing=flag)
        on = getattr(trainer.policy, "is_activation_checkpointing", None)  # transformers >= 5
        assert (trainer.policy.is_gradient_checkpointing if on is None else on) is flag
        calls = []  # a pre-hook: the recomputation in backward stops early, before a forward hook would fire
        trainer.policy.transformer.h[0].attn.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        trainer.train()
        results[flag] = (torch.cat([p.detach().flatten() for p in trainer.policy.parameters()]), sum(calls))
    # with checkpointing the first block's attention runs again in the backward pass: more calls, same weights
    assert results[True][1] > results[False][1]
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trainer_name", ["ppo", "grpo"])
def test_fp16_autocast_runs_the_forwards_in_float16_with_a_loss_scaler(tmp_path, trainer_name):
    on = make(tmp_path / "on", trainer_name, mixed_precision="fp16")
    seen = record_head_dtypes(on)
    scaler = on.state.grad_scaler
    assert isinstance(scaler, torch.amp.GradScaler)
    (row,) = on.train()
    assert torch.float16 in seen
    assert all(p.dtype == torch.float32 for p in on.policy.parameters())
    assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if isinstance(v, float))
    # the scaler scaled the losses (its scale is set on first use) and is part of the checkpointed state
    assert scaler.get_scale() > 1.0
    assert on.state.state_dict({})["grad_scaler"]["scale"] == scaler.get_scale()
    assert make(tmp_path / "off", trainer_name).state.grad_scaler is None


def test_optimizer_state_keyed_by_name_round_trips_to_positions():
    """What lets a sharded run's checkpoint (optimiser state by name) resume in one process, and back."""
    from tether.sharding import optimizer_state_by_name, optimizer_state_by_position

    tok = make_toy_tokenizer()
    model = make_toy_model(tok)
    model.transformer.wpe.weight.requires_grad_(False)  # a frozen parameter has no position
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=torch.tensor([[2, 3, 4]])).logits.sum().backward()
    opt.step()
    saved = opt.state_dict()
    named = optimizer_state_by_name(model, saved)
    assert "transformer.h.0.attn.c_attn.weight" in named["state"]
    assert "transformer.wpe.weight" not in named["state"]
    back = optimizer_state_by_position(model, named)
    assert back["param_groups"] == saved["param_groups"]
    for i, state in saved["state"].items():
        torch.testing.assert_close(back["state"][i]["exp_avg"], state["exp_avg"], rtol=0, atol=0)


def test_a_bfloat16_checkpoint_is_loaded_as_a_float32_policy(tmp_path):
    """Weights (and so AdamW state) are float32 whatever the checkpoint's dtype; the plan counts them so."""
    from tether.models import load_causal_lm
    from tether.plan import model_shape

    make_toy_model(make_toy_tokenizer()).to(torch.bfloat16).save_pretrained(tmp_path)
    assert load_causal_lm(tmp_path).dtype == torch.float32
    assert model_shape(tmp_path).param_bytes == 4
