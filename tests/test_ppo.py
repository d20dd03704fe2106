"""PPO trainer: smoke, first-step KL, determinism, resume, micro-batch invariance, errors, CLI."""

from __future__ import annotations

import copy
import json
import math
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import tether
from tether.cli import main as cli_main
from tether.config import ConfigError
from tether.rewards import RewardError
from tether.toy import CharFractionReward, make_toy_model, make_toy_prompts, make_toy_tokenizer

VOLATILE = ("time/", "perf/")  # wall-clock metrics differ between runs by nature


def small_config(out: Path, steps: int = 2, **overrides) -> tether.PPOConfig:
    base = dict(
        output_dir=str(out),
        seed=0,
        learning_rate=1e-3,
        total_episodes=8 * steps,
        rollout_batch_size=8,
        mini_batch_size=4,
        micro_batch_size=2,
        ppo_epochs=2,
        sampling=tether.SamplingConfig(max_new_tokens=6),
        kl=tether.KLConfig(coef=0.05),
        logging=tether.LoggingConfig(report_to=["jsonl"], progress_bar=False, save_steps=0, sample_steps=1),
    )
    base.update(overrides)
    return tether.PPOConfig(**base)


def make_trainer(out: Path, steps: int = 2, reward=None, **overrides) -> tether.PPOTrainer:
    tok = make_toy_tokenizer()
    return tether.PPOTrainer(
        small_config(out, steps, **overrides),
        policy=make_toy_model(tok, seed=0),
        tokenizer=tok,
        reward=reward or CharFractionReward(),
        prompts=make_toy_prompts(32, seed=0),
    )


def stable(history):
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in history]


def test_smoke_run_writes_run_dir_and_changes_parameters(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    before = copy.deepcopy(trainer.policy.state_dict())
    value_before = copy.deepcopy(trainer.value_model.state_dict())
    history = trainer.train()
    assert len(history) == 2
    for row in history:
        for key in ("objective/scores", "objective/kl", "objective/entropy", "policy/approx_kl", "value/loss"):
            assert math.isfinite(row[key]), key
    changed = [k for k, v in trainer.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no policy parameter changed"
    assert not torch.equal(trainer.value_model.head.weight, value_before["head.weight"])
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert "objective/scores" in lines[0] and "objective/kl" in lines[0]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "response", "score", "kl", "step"} <= set(samples[0])
    assert (run / "config.yaml").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(run / "final")
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(reloaded(ids).logits, trainer.policy.eval()(ids).logits)


def test_first_step_kl_is_exactly_zero_and_value_head_starts_at_zero(tmp_path):
    trainer = make_trainer(tmp_path / "run", steps=1)
    assert torch.count_nonzero(trainer.value_model.head.weight) == 0
    ro = trainer.rollout(make_toy_prompts(8, seed=3))
    assert torch.equal(ro.logprobs, ro.ref_logprobs)
    assert torch.count_nonzero(ro.values) == 0
    history = trainer.train()
    assert history[0]["objective/kl"] == 0.0
    assert history[0]["kl/negative_fraction"] == 0.0


def test_same_seed_gives_identical_metrics(tmp_path):
    a = make_trainer(tmp_path / "a").train()
    b = make_trainer(tmp_path / "b").train()
    assert stable(a) == stable(b)


def test_resume_equals_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "full", steps=4, logging=tether.LoggingConfig(
        report_to=["jsonl"], progress_bar=False, save_steps=2, sample_steps=1)).train()

    interrupted = make_trainer(tmp_path / "cut", steps=4, logging=tether.LoggingConfig(
        report_to=["jsonl"], progress_bar=False, save_steps=2, sample_steps=1))
    real_checkpoint = interrupted._checkpoint

    def crash_after_step_3_started():
        path = real_checkpoint()
        if interrupted.step == 2:
            raise KeyboardInterrupt  # the process dies right after the step-2 checkpoint
        return path

    interrupted._checkpoint = crash_after_step_3_started
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()

    resumed = make_trainer(tmp_path / "cut", steps=4, logging=tether.LoggingConfig(
        report_to=["jsonl"], progress_bar=False, save_steps=2, sample_steps=1))
    ckpt = resumed.resume()
    assert ckpt.name == "step-000002"
    rest = resumed.train()
    assert stable(rest) == stable(full[2:])
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    for name in ("step-000002", "step-000004"):
        assert (tmp_path / "cut" / "checkpoints" / name / "trainer_state.pt").is_file()


def test_micro_batch_split_does_not_change_the_update(tmp_path):
    """micro=1 x accumulation 8 gives the same parameters as micro=8 x accumulation 1."""
    results = []
    for micro in (8, 1):
        trainer = make_trainer(tmp_path / f"m{micro}", steps=1, mini_batch_size=8, micro_batch_size=micro,
                               ppo_epochs=1, max_grad_norm=None)
        torch.manual_seed(0)
        ro = trainer.rollout(make_toy_prompts(8, seed=5))
        adv = torch.randn(ro.logprobs.shape).masked_fill(~ro.response_mask, 0.0)
        ret = torch.randn(ro.logprobs.shape).masked_fill(~ro.response_mask, 0.0)
        trainer.update(ro, adv, ret)
        results.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-5, atol=1e-6, msg=key)
    initial = make_toy_model(make_toy_tokenizer(), seed=0).state_dict()
    assert any(not torch.equal(results[0][f"policy.{k}"], v) for k, v in initial.items()), "update changed nothing"


def test_seq_mean_aggregation_also_split_invariant(tmp_path):
    results = []
    for micro in (4, 1):
        trainer = make_trainer(tmp_path / f"s{micro}", steps=1, mini_batch_size=8, micro_batch_size=micro,
                               ppo_epochs=1, max_grad_norm=None, loss_aggregation="seq-mean")
        torch.manual_seed(0)
        ro = trainer.rollout(make_toy_prompts(8, seed=6))
        adv = torch.randn(ro.logprobs.shape).masked_fill(~ro.response_mask, 0.0)
        trainer.update(ro, adv, adv.clone())
        results.append(trainer.model.state_dict())
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_kl_biasing_sampling_refused(tmp_path):
    with pytest.raises(tether.KLBiasError, match="negative"):
        make_trainer(tmp_path / "r", sampling=tether.SamplingConfig(max_new_tokens=4, top_k=10))


def test_batch_sizes_must_divide(tmp_path):
    with pytest.raises(ConfigError, match="mini_batch_size"):
        small_config(tmp_path, rollout_batch_size=8, mini_batch_size=3, micro_batch_size=1)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda prompts, responses, **_: [0.0] * (len(responses) - 1), "values"),
        (lambda prompts, responses, **_: [float("nan")] * len(responses), "nan"),
        (lambda prompts, responses, **_: ["high"] * len(responses), "high"),
    ],
)
def test_bad_reward_function_gets_clear_error(tmp_path, fn, message):
    trainer = make_trainer(tmp_path / "r", reward=fn)
    with pytest.raises(RewardError, match=f"(?i){message}"):
        trainer.train()


def test_extra_prompt_columns_reach_the_reward_function(tmp_path):
    seen = {}

    def reward(prompts, responses, target, **_):
        seen["target"] = list(target)
        return [float(t == "x") for t in target]

    tok = make_toy_tokenizer()
    prompts = [{"prompt": p, "target": "x" if i % 2 else "y"} for i, p in enumerate(make_toy_prompts(16))]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in prompts))
    trainer = tether.PPOTrainer(small_config(tmp_path / "run", steps=1), policy=make_toy_model(tok), tokenizer=tok,
                                reward=reward, prompts=str(path))
    history = trainer.train()
    assert set(seen["target"]) <= {"x", "y"} and len(seen["target"]) == 8
    assert history[0]["objective/scores"] == pytest.approx(sum(t == "x" for t in seen["target"]) / 8)


def test_cli_ppo_trains_and_resumes(tmp_path, capsys):
    tok = make_toy_tokenizer()
    make_toy_model(tok).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in make_toy_prompts(16)))
    (tmp_path / "rewards.py").write_text(textwrap.dedent("""
        def vowels(prompts, responses, **columns):
            return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]
    """))
    (tmp_path / "run.yaml").write_text("rollout_batch_size: 8\nmini_batch_size: 4\nmicro_batch_size: 4\n"
                                      "total_episodes: 16\nsampling: {max_new_tokens: 5}\n"
                                      "logging: {report_to: [jsonl], progress_bar: false, save_steps: 1}\n")
    args = ["ppo", "--config", str(tmp_path / "run.yaml"), "--policy", str(tmp_path / "policy"),
            "--reward", f"{tmp_path / 'rewards.py'}:vowels", "--prompts", str(tmp_path / "prompts.jsonl"),
            "--output-dir", str(tmp_path / "out"), "--kl.coef", "0.2", "--learning_rate", "1e-4"]
    assert cli_main(args) == 0
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["kl/coef"] == 0.2
    assert (tmp_path / "out" / "final" / "config.json").is_file()
    # Resuming a finished run continues from its last checkpoint and has nothing left to do.
    assert cli_main(["ppo", "--resume", str(tmp_path / "out"), *args[1:]]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_cli_resume_needs_only_the_run_directory_and_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """`tether ppo --resume DIR` reads config.yaml and inputs.yaml from DIR (paths made absolute)."""
    tok = make_toy_tokenizer()
    make_toy_model(tok).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in make_toy_prompts(16)))
    (tmp_path / "rewards.py").write_text("def vowels(prompts, responses, **c):\n"
                                         "    return [sum(x in 'aeiou' for x in r) / max(len(r), 1) for r in responses]\n")
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    common = ["--policy", "policy", "--reward", "rewards.py:vowels", "--prompts", "prompts.jsonl",
              "--rollout_batch_size", "8", "--mini_batch_size", "4", "--micro_batch_size", "4",
              "--total_episodes", "24", "--sampling.max_new_tokens", "5", "--learning_rate", "1e-3",
              "--logging.report_to", "jsonl", "--logging.progress_bar", "false", "--logging.save_steps", "1",
              "--logging.report", "false", "--device", "cpu"]
    assert cli_main(["ppo", *common, "--output_dir", "whole"]) == 0
    assert cli_main(["ppo", *common, "--output_dir", "cut"]) == 0
    inputs = yaml.safe_load((tmp_path / "cut" / "inputs.yaml").read_text())
    assert inputs == {"policy": str(tmp_path / "policy"), "prompts": str(tmp_path / "prompts.jsonl"),
                      "reward": f"{tmp_path / 'rewards.py'}:vowels"}
    # Cut the run after step 2: drop the last checkpoint and the final model, as if it had been killed.
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000003")
    shutil.rmtree(tmp_path / "cut" / "final")
    monkeypatch.chdir(tmp_path / "cut")  # another working directory: the saved paths are absolute
    assert cli_main(["ppo", "--resume", "."]) == 0
    assert "(step 2)" in capsys.readouterr().out
    whole = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in cut] == [1, 2, 3]
    volatile = ("time", "perf/")  # wall-clock stamps and timings
    for a, b in zip(whole, cut, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith(volatile)} == \
               {k: v for k, v in b.items() if not k.startswith(volatile)}
    assert (tmp_path / "cut" / "final" / "config.json").is_file()
    assert cli_main(["ppo", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_cli_preset_sets_the_run_config(tmp_path):
    tok = make_toy_tokenizer()
    make_toy_model(tok).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in make_toy_prompts(16)))
    (tmp_path / "rewards.py").write_text("def f(prompts, responses, **c):\n    return [0.0] * len(responses)\n")
    assert cli_main(["ppo", "--preset", "tiny", "--policy", str(tmp_path / "policy"), "--reward",
                     f"{tmp_path / 'rewards.py'}:f", "--prompts", str(tmp_path / "prompts.jsonl"),
                     "--output_dir", str(tmp_path / "out"), "--total_episodes", "16", "--device", "cpu",
                     "--logging.report_to", "jsonl", "--logging.progress_bar", "false",
                     "--logging.report", "false"]) == 0
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["rollout_batch_size"] == 8 and saved["sampling"]["max_new_tokens"] == 16
    assert saved["total_episodes"] == 16  # the command line over the preset
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2


def test_cli_reports_unknown_key_and_missing_file(tmp_path, capsys):
    assert cli_main(["ppo", "--policy", "x", "--reward", "y.py:f", "--prompts", "z", "--sampling.top_q", "1"]) == 2
    assert "sampling.top_q" in capsys.readouterr().err
    (tmp_path / "rewards.py").write_text("def f(prompts, responses, **c):\n    return [0.0] * len(responses)\n")
    tok = make_toy_tokenizer()
    make_toy_model(tok).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    code = cli_main(["ppo", "--policy", str(tmp_path / "policy"), "--reward", f"{tmp_path / 'rewards.py'}:f",
                     "--prompts", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o")])
    assert code == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("tether") == "tether.cli:main"


def test_python_dash_m_tether_is_the_command_line():
    """`python -m tether` runs the CLI, so `torchrun -m tether ppo` and `accelerate launch -m tether` start it."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tether", "grpo", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: tether grpo" in done.stdout
    done = subprocess.run([sys.executable, "-m", "tether", "nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown command" in done.stderr


def test_value_model_starts_from_a_decoder_reward_model_with_the_policy_vocabulary(tmp_path):
    from transformers import GPT2ForSequenceClassification

    tok = make_toy_tokenizer()
    policy = make_toy_model(tok, seed=0)
    torch.manual_seed(1)
    rm_config = copy.deepcopy(policy.config)
    rm_config.num_labels = 1
    rm = GPT2ForSequenceClassification(rm_config)
    trainer = tether.PPOTrainer(small_config(tmp_path / "a", steps=1), policy=policy, tokenizer=tok,
                                reward=(rm, tok), prompts=make_toy_prompts(16))
    rm_wte = rm.transformer.wte.weight
    assert torch.equal(trainer.value_model.backbone.wte.weight, rm_wte)
    assert not torch.equal(trainer.value_model.backbone.wte.weight, policy.transformer.wte.weight)
    assert torch.count_nonzero(trainer.value_model.head.weight) == 0  # the head starts at zero regardless
    assert trainer.value_model.backbone.wte.weight.data_ptr() != rm_wte.data_ptr()  # a copy, not shared


def test_lora_policy_uses_adapter_disabled_reference_and_saves_merged(tmp_path):
    from peft import LoraConfig, get_peft_model

    tok = make_toy_tokenizer()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    policy = get_peft_model(make_toy_model(tok, seed=0), lora)
    cfg = small_config(tmp_path / "run", steps=2, learning_rate=1e-2,
                       logging=tether.LoggingConfig(report_to=["jsonl"], progress_bar=False, save_steps=1))
    trainer = tether.PPOTrainer(cfg, policy=policy, tokenizer=tok, reward=CharFractionReward(),
                                prompts=make_toy_prompts(16))
    base_params = sum(p.numel() for p in make_toy_model(tok).parameters())
    ref_params = sum(p.numel() for p in trainer.ref_policy.parameters())
    assert ref_params == 0  # no second copy of the weights: the reference is the base, adapters off
    history = trainer.train()
    assert history[0]["objective/kl"] == 0.0 and history[-1]["objective/kl"] != 0.0
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert sum(p.numel() for p in final.parameters()) == base_params  # merged, plain GPT-2
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(final(ids).logits, trainer.policy.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    resumed = tether.PPOTrainer(cfg, policy=get_peft_model(make_toy_model(tok, seed=0), lora), tokenizer=tok,
                                reward=CharFractionReward(), prompts=make_toy_prompts(16))
    resumed.resume()
    torch.testing.assert_close(resumed.policy.eval()(input_ids=ids).logits, trainer.policy(input_ids=ids).logits)


def test_a_fresh_run_never_mixes_into_an_earlier_run_directory(tmp_path):
    make_trainer(tmp_path / "run", steps=1).train()
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        make_trainer(tmp_path / "run", steps=1).train()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before  # untouched
    make_trainer(tmp_path / "run", steps=2, overwrite_output_dir=True).train()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
