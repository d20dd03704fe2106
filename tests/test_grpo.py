"""GRPO-family trainer: config checks, smoke, no reference at kl.coef 0, invariance, resume, chat prompts, CLI."""

from __future__ import annotations

import copy
import json
import shutil
import textwrap
import typing
from pathlib import Path

import pytest
import torch

import tether
from tether.advantages import ADVANTAGE_ESTIMATORS
from tether.cli import main as cli_main
from tether.config import ConfigError
from tether.losses import LOSS_AGGREGATIONS, POLICY_LOSSES
from tether.models import AdapterDisabledReference
from tether.toy import CharFractionReward, make_toy_model, make_toy_prompts, make_toy_tokenizer

VOLATILE = ("time", "perf/")  # wall-clock stamps and timings differ between runs by nature


def grpo_config(out: Path, steps: int = 2, **overrides) -> tether.GRPOConfig:
    base = dict(
        output_dir=str(out),
        seed=0,
        learning_rate=3e-3,
        total_episodes=4 * steps,
        rollout_batch_size=4,
        num_generations=4,
        mini_batch_size=8,
        micro_batch_size=4,
        sampling=tether.SamplingConfig(max_new_tokens=6),
        kl=tether.KLConfig(coef=0.05, estimator="k3", placement="loss"),
        logging=tether.LoggingConfig(report_to=["jsonl"], progress_bar=False, save_steps=0, sample_steps=1),
    )
    base.update(overrides)
    return tether.GRPOConfig(**base)


def grpo_trainer(out: Path, steps: int = 2, reward=None, prompts=None, tok=None, policy=None, **overrides):
    tok = tok or make_toy_tokenizer()
    return tether.GRPOTrainer(
        grpo_config(out, steps, **overrides),
        policy=policy if policy is not None else make_toy_model(tok, seed=0),
        tokenizer=tok,
        reward=reward or CharFractionReward(),
        prompts=prompts or make_toy_prompts(32, seed=0),
    )


def stable(history):
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in history]


def test_choices_are_exactly_the_registries():
    hints = typing.get_type_hints(tether.GRPOConfig)
    assert set(typing.get_args(hints["advantage"])) <= set(ADVANTAGE_ESTIMATORS)
    assert set(typing.get_args(hints["policy_loss"])) == set(POLICY_LOSSES)
    assert set(typing.get_args(hints["loss_aggregation"])) == set(LOSS_AGGREGATIONS)


def test_batch_sizes_must_divide_the_sequences_of_a_step(tmp_path):
    # 3 prompts x 4 completions = 12 sequences: a mini-batch of 8 does not divide them
    with pytest.raises(ConfigError, match=r"rollout_batch_size x num_generations / mini_batch_size: 12 is not divisible by 8"):
        grpo_config(tmp_path, rollout_batch_size=3, total_episodes=6)
    with pytest.raises(ConfigError, match="mini_batch_size / micro_batch_size"):
        grpo_config(tmp_path, micro_batch_size=3)
    with pytest.raises(ConfigError, match="needs num_generations >= 2"):
        grpo_config(tmp_path, num_generations=1, mini_batch_size=4)
    with pytest.raises(ConfigError, match="dual_clip must be > 1"):
        grpo_config(tmp_path, policy_loss="dual-clip", dual_clip=0.5)
    grpo_config(tmp_path, num_generations=1, mini_batch_size=4, advantage="reinforce++")  # no groups needed


def test_smoke_writes_the_run_layout_and_changes_parameters(tmp_path):
    trainer = grpo_trainer(tmp_path / "run", logging=tether.LoggingConfig(
        report_to=["jsonl"], progress_bar=False, save_steps=1, sample_steps=1))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    history = trainer.train()
    assert len(history) == 2
    for row in history:
        for key in ("objective/scores", "objective/scores_std", "objective/kl", "objective/entropy",
                    "rollout/frac_reward_zero_std", "policy/clipfrac_low", "policy/clipfrac_high",
                    "rollout/response_length", "rollout/response_length_min", "rollout/response_length_max",
                    "rollout/truncated_fraction", "rewards/char_fraction/mean", "policy/kl_loss"):
            assert key in row and torch.isfinite(torch.tensor(row[key])), key
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert history[0]["episode"] == 4 and history[1]["episode"] == 8  # episodes count prompts
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters(), strict=True))
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "report.html", "final/config.json",
                 "checkpoints/step-000002/trainer_state.pt", "checkpoints/step-000002/policy/config.json"):
        assert (run / name).exists(), name
    assert "num_generations: 4" in (run / "config.yaml").read_text()


def test_each_prompt_is_answered_g_times_in_a_row(tmp_path):
    seen: list[list[str]] = []

    def reward(prompts, responses, **_):
        seen.append(list(prompts))
        return [0.0] * len(prompts)

    grpo_trainer(tmp_path, steps=1, reward=reward).train()
    (prompts,) = seen
    assert len(prompts) == 16
    groups = [prompts[i : i + 4] for i in range(0, 16, 4)]
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 4


def test_equal_scores_in_every_group_give_zero_advantage_and_no_update(tmp_path):
    trainer = grpo_trainer(tmp_path, steps=1, reward=lambda p, r, **_: [1.0] * len(r),
                           kl=tether.KLConfig(coef=0.0))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    (row,) = trainer.train()
    assert row["rollout/frac_reward_zero_std"] == 1.0
    assert row["policy/loss"] == 0.0
    # zero advantages and no KL term: AdamW with zero gradients and no weight decay leaves the policy as it was
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters(), strict=True))


def test_kl_coef_zero_loads_no_reference(tmp_path):
    trainer = grpo_trainer(tmp_path, steps=1, kl=tether.KLConfig(coef=0.0))
    assert trainer.ref_policy is None
    (row,) = trainer.train()
    assert "objective/kl" not in row and "policy/kl_loss" not in row
    assert grpo_trainer(tmp_path / "b", steps=1).ref_policy is not None


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(loss_aggregation="seq-mean-token-mean", policy_loss="gspo", cliprange=3e-4, cliprange_high=4e-4),
        dict(loss_aggregation="token-sum-norm", scale_rewards="none", advantage="rloo"),
        dict(policy_loss="dual-clip", kl=tether.KLConfig(coef=0.1, estimator="full", placement="loss")),
    ],
)
def test_micro_batch_split_does_not_change_the_update(tmp_path, overrides):
    results = []
    for micro in (8, 1):
        trainer = grpo_trainer(tmp_path / f"m{micro}", steps=1, micro_batch_size=micro, **overrides)
        trainer.train()
        results.append(torch.cat([p.detach().flatten() for p in trainer.policy.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_same_seed_same_run_and_resume_equals_an_uninterrupted_run(tmp_path):
    logging = tether.LoggingConfig(report_to=["jsonl"], progress_bar=False, save_steps=1, sample_steps=1,
                                   report=False)
    whole = grpo_trainer(tmp_path / "whole", steps=3, logging=logging, num_iterations=2).train()
    cut = grpo_trainer(tmp_path / "cut", steps=3, logging=logging, num_iterations=2)
    assert stable(cut.train()) == stable(whole)
    # Cut the run after step 2, as if it had been killed: no step-3 checkpoint, no final model.
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000003")
    shutil.rmtree(tmp_path / "cut" / "final")
    resumed = grpo_trainer(tmp_path / "cut", steps=3, logging=logging, num_iterations=2)
    assert resumed.resume().name == "step-000002" and resumed.step == 2
    assert stable(resumed.train()) == stable(whole[2:])
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert (tmp_path / "cut" / "final" / "config.json").is_file()


def test_conversational_prompts_are_rendered_with_the_chat_template(tmp_path):
    tok = make_toy_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}.{% endif %}"
    conversations = [[{"role": "user", "content": p}] for p in make_toy_prompts(8, seed=1)]
    seen: list[str] = []

    def reward(prompts, responses, prompt_messages, **_):
        seen.extend(prompts)
        assert all(isinstance(m, list) and m[0]["role"] == "user" for m in prompt_messages)
        return [float(len(r)) for r in responses]

    trainer = grpo_trainer(tmp_path, steps=1, reward=reward, prompts=conversations, tok=tok)
    assert trainer.data.chat
    trainer.train()
    expected = {f"{c[0]['content']} ." for c in conversations}
    assert set(seen) <= expected and len(seen) == 16


def test_lora_policy_uses_the_adapter_disabled_reference(tmp_path):
    from peft import LoraConfig, get_peft_model

    tok = make_toy_tokenizer()
    policy = get_peft_model(make_toy_model(tok), LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0))
    trainer = grpo_trainer(tmp_path, steps=2, tok=tok, policy=policy)
    assert isinstance(trainer.ref_policy, AdapterDisabledReference)
    history = trainer.train()
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert history[1]["objective/kl"] != 0.0  # the adapters moved; the reference did not
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "final") is not None  # merged, loads plainly


def test_cli_grpo_writes_the_run_layout_and_resumes(tmp_path, monkeypatch, capsys):
    tok = make_toy_tokenizer()
    make_toy_model(tok).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    rows = [{"prompt": p, "answer": "a" * (i % 3)} for i, p in enumerate(make_toy_prompts(16))]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "rewards.py").write_text(textwrap.dedent("""
        def count_a(prompts, completions, answer, **_):
            return [float(c.count("a") == len(a)) for c, a in zip(completions, answer)]
    """))
    monkeypatch.chdir(tmp_path)
    args = ["grpo", "--policy", "policy", "--reward", "rewards.py:count_a", "--reward", "regex:a",
            "--reward_weights", "1,0.5", "--prompts", "prompts.jsonl", "--rollout_batch_size", "4",
            "--num_generations", "2", "--mini_batch_size", "8", "--micro_batch_size", "4", "--total_episodes", "12",
            "--sampling.max_new_tokens", "5", "--logging.report_to", "jsonl", "--logging.progress_bar", "false",
            "--logging.save_steps", "1", "--device", "cpu", "--output_dir", "run"]
    assert cli_main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"rewards/count_a/mean", "rewards/regex/mean"} <= set(records[0])
    for name in ("config.yaml", "inputs.yaml", "samples.jsonl", "report.html", "final/config.json"):
        assert (tmp_path / "run" / name).exists(), name
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000003")
    shutil.rmtree(tmp_path / "run" / "final")
    capsys.readouterr()
    assert cli_main(["grpo", "--resume", "run"]) == 0
    assert "(step 2)" in capsys.readouterr().out
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert cli_main(["grpo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--num_generations" in out and "--policy_loss" in out and "tiny" in out


def test_every_grpo_preset_is_a_valid_config_of_its_variant():
    from tether.config import load_config
    from tether.presets import preset_names, preset_path

    names = preset_names("grpo")
    assert {"tiny", "dr-grpo", "dapo", "gspo", "rloo", "reinforce-pp"} <= set(names)
    configs = {name: load_config(tether.GRPOConfig, [], base_file=preset_path(name, "grpo"))[0] for name in names}
    assert (configs["dr-grpo"].scale_rewards, configs["dr-grpo"].loss_aggregation) == ("none", "token-sum-norm")
    assert configs["dapo"].cliprange_high == 0.28 and configs["gspo"].policy_loss == "gspo"
    assert configs["rloo"].advantage == "rloo" and configs["reinforce-pp"].kl.placement == "reward"
    with pytest.raises(ConfigError, match="unknown grpo preset 'huge'"):
        preset_path("huge", "grpo")


@pytest.mark.parametrize("trainer_cls", ["ppo", "grpo"])
def test_a_policy_from_a_trained_adapter_is_tethered_to_that_adapter_not_the_base(tmp_path, trainer_cls):
    """The reference is the policy as it starts: with a trained LoRA adapter loaded, the base model is not it."""
    from peft import LoraConfig, PeftModel, get_peft_model

    tok = make_toy_tokenizer()
    base = make_toy_model(tok)
    trained = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0))
    with torch.no_grad():  # an adapter "from an earlier run": B != 0, so it changes the model's function
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    trained.save_pretrained(tmp_path / "adapter")
    policy = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter", is_trainable=True)
    logging = tether.LoggingConfig(report_to=["jsonl"], progress_bar=False, save_steps=0, report=False)
    if trainer_cls == "grpo":
        trainer = grpo_trainer(tmp_path / "run", steps=1, tok=tok, policy=policy, logging=logging)
    else:
        trainer = tether.PPOTrainer(
            tether.PPOConfig(output_dir=str(tmp_path / "run"), total_episodes=8, rollout_batch_size=8,
                             mini_batch_size=8, micro_batch_size=8, ppo_epochs=1, logging=logging,
                             sampling=tether.SamplingConfig(max_new_tokens=6)),
            policy=policy, tokenizer=tok, reward=CharFractionReward(), prompts=make_toy_prompts(16))
    assert not isinstance(trainer.ref_policy, AdapterDisabledReference)
    (row,) = trainer.train()
    assert row["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the first rollout
    # Against the bare base model the same policy is far away: the tether would pull it back to the base.
    ro = trainer.rollout(make_toy_prompts(8, seed=3))
    with torch.no_grad(), policy.disable_adapter():
        from tether.logprobs import sequence_logprobs

        base_lp = sequence_logprobs(policy, ro.input_ids, ro.attention_mask, ro.prompt_length).logprobs
    assert ((ro.model_logprobs - base_lp).abs() * ro.response_mask).sum() > 1.0


def test_the_kl_safe_sampling_rules_of_ppo_hold_for_grpo(tmp_path):
    from tether.sampling import KLBiasError

    with pytest.raises(KLBiasError, match="negative"):
        grpo_trainer(tmp_path, sampling=tether.SamplingConfig(max_new_tokens=6, top_p=0.9))
    with pytest.raises(ConfigError, match="k3' or 'full"):
        grpo_config(tmp_path, sampling=tether.SamplingConfig(top_k=5, allow_biased=True),
                    kl=tether.KLConfig(estimator="k1", placement="reward"))
    # allowed with an estimator that cannot go negative: the ratio uses the warped distribution it sampled from
    trainer = grpo_trainer(tmp_path / "ok", steps=1,
                           sampling=tether.SamplingConfig(max_new_tokens=6, top_k=5, allow_biased=True))
    (row,) = trainer.train()
    assert row["rollout/logprob_diff_max"] < 1e-4 and row["objective/kl"] >= 0.0
