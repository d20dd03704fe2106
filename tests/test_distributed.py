"""Several processes (torchrun, gloo on CPU) give the one-process result: the update, and whole runs that learn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tether
from tether.toy import make_toy_tokenizer

SCRIPT = Path(__file__).resolve().parent / "distributed_worker.py"


def launch(
    args: list[str], nproc: int, timeout: float = 300, ok: bool = True, torchrun: bool | None = None
) -> subprocess.CompletedProcess[str]:
    """The worker under torchrun (by default when nproc > 1), else in a plain process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DIST_TIMEOUT_S": "60"}
    if not (nproc > 1 if torchrun is None else torchrun):
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(SCRIPT), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize(
    ("trainer", "sharding", "nproc"),
    [("ppo", "none", 2), ("grpo", "none", 2), ("ppo", "fsdp", 2), ("grpo", "fsdp-frozen", 2), ("ppo", "fsdp", 1)],
)
def test_two_processes_update_as_one_process_given_the_same_rollout(tmp_path, trainer, sharding, nproc):
    """2 processes x half of every mini-batch, gradients summed, equals 1 process x the whole mini-batch: with
    whole models on each process, and with the policy (and value model, and the reference when asked) sharded
    over the two (FSDP2). FSDP also runs in one process under torchrun (one GPU): the same update again."""
    launch(["update", trainer, str(tmp_path / "one")], nproc=1)
    launch(["update", trainer, str(tmp_path / "two"), sharding], nproc=nproc, torchrun=True)
    one, two = (torch.load(tmp_path / name / "update.pt") for name in ("one", "two"))
    assert (one["world"], two["world"]) == (1, nproc)
    assert one["sharded"] == (False, False)
    assert two["sharded"] == (sharding != "none", sharding == "fsdp-frozen")
    torch.testing.assert_close(two["params"], one["params"], rtol=1e-5, atol=1e-6)
    assert one["stats"].keys() == two["stats"].keys()
    for key, value in one["stats"].items():
        assert two["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_a_two_process_run_learns_and_only_rank_0_writes(tmp_path):
    launch(["run", "ppo", str(tmp_path / "one")], nproc=1)
    launch(["run", "ppo", str(tmp_path / "two")], nproc=2)
    runs = {n: json.loads((tmp_path / n / "history.json").read_text()) for n in ("one", "two")}
    for name, history in runs.items():
        scores = [row["objective/scores"] for row in history]
        assert sum(scores[-5:]) / 5 > sum(scores[:5]) / 5 + 0.15, (name, scores)
        assert all(row["episode"] == 16 * row["step"] for row in history)  # batch sizes are global
    run = tmp_path / "two" / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 25))  # one writer, no duplicates
    assert (run / "final" / "config.json").is_file() and (run / "report.html").is_file()
    assert (run / "checkpoints" / "step-000024" / "trainer_state.pt").is_file()


@pytest.mark.parametrize(("sharding", "resume_nproc"), [("none", 1), ("fsdp", 2)])
def test_a_killed_rank_stops_the_job_promptly_and_the_last_checkpoint_is_intact(tmp_path, sharding, resume_nproc):
    """Rank 1 dies in step 5: the job exits well within the collective timeout, naming rank 1; step 4 loads,
    and the run resumes from it (whole models: in one process; sharded: sharded again)."""
    import time

    from transformers import AutoModelForCausalLM

    from tether.checkpoint import latest_checkpoint, load_state

    start = time.perf_counter()
    done = launch(["kill", "ppo", str(tmp_path), sharding], nproc=2, ok=False)
    assert done.returncode != 0 and time.perf_counter() - start < 120
    report = done.stdout + done.stderr
    assert "rank      : 1" in report or "rank: 1" in report, report[-2000:]
    run = tmp_path / "run"
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step-000004"
    state = load_state(ckpt)
    assert state["step"] == 4
    # a sharded run's checkpoint holds whole tensors: weights that load alone, the optimiser state by name
    assert state.get("optimizer_keys") == ("name" if sharding == "fsdp" else None)
    saved = AutoModelForCausalLM.from_pretrained(ckpt / "policy")
    assert saved.transformer.wte.weight.shape[0] == len(make_toy_tokenizer())
    assert not (run / "final").exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # The run resumes (checkpoints hold no per-process state) and finishes.
    launch(["resume", "ppo", str(tmp_path), sharding], nproc=resume_nproc)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    assert not torch.equal(final.transformer.wte.weight, saved.transformer.wte.weight)  # trained on after step 4


def test_accelerate_launch_with_the_shipped_fsdp_config_shards_and_saves_a_loadable_model(tmp_path):
    """`accelerate launch --config_file examples/accelerate/fsdp.yaml -m tether grpo ...` (made a 2-process CPU
    config): the run reads FSDP from accelerate's environment, shards the policy, the reference and a reward model,
    and final/ loads with from_pretrained."""
    import math

    import yaml
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2ForSequenceClassification

    from tether.toy import make_toy_model, make_toy_prompts

    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples/accelerate/fsdp.yaml").read_text())
    shipped.update(use_cpu=True, num_processes=2, mixed_precision="no")
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(shipped))
    tok = make_toy_tokenizer()
    make_toy_model(tok).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in make_toy_prompts(16)))
    (tmp_path / "reward.py").write_text("def vowels(prompts, responses, **kw):\n"
                                        "    return [sum(c in 'aeiou' for c in r) / max(len(r), 1) for r in responses]\n")
    torch.manual_seed(0)  # a tiny reward model, sharded too (shard_frozen_models)
    rm_config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, num_labels=1,
                           pad_token_id=tok.pad_token_id)
    GPT2ForSequenceClassification(rm_config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml"),
           "-m", "tether", "grpo", "--policy", str(tmp_path / "policy"),
           "--reward", f"{tmp_path}/reward.py:vowels", "--reward", str(tmp_path / "rm"), "--shard_frozen_models", "true",
           "--prompts", str(tmp_path / "prompts.jsonl"), "--output_dir", str(tmp_path / "run"),
           "--total_episodes", "8", "--rollout_batch_size", "4", "--num_generations", "2", "--mini_batch_size", "8",
           "--micro_batch_size", "2", "--sampling.max_new_tokens", "6", "--device", "cpu",
           "--logging.progress_bar", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DIST_TIMEOUT_S": "60"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sharding=fsdp (accelerate FSDP config)" in done.stderr
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["sharding"] == "fsdp"
    assert done.stdout.count("final model:") == 1  # one process prints, as one writes
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["rewards/rm/mean"]) for row in rows)  # the sharded reward model scored
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert final.num_parameters() == make_toy_model(tok).num_parameters()


def test_launcher_settings_come_from_accelerates_environment(monkeypatch):
    from tether.config import ConfigError
    from tether.sharding import apply_launcher_settings, reshard_after_forward

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION",
                 "FSDP_SHARDING_STRATEGY", "FSDP_RESHARD_AFTER_FORWARD"):
        monkeypatch.delenv(name, raising=False)
    cfg = tether.GRPOConfig(total_episodes=8, rollout_batch_size=4, mini_batch_size=8, micro_batch_size=2)
    assert apply_launcher_settings(cfg, 2) == [] and cfg.sharding == "none" and cfg.mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert len(apply_launcher_settings(cfg, 2)) == 2 and (cfg.sharding, cfg.mixed_precision) == ("fsdp", "bf16")
    assert reshard_after_forward() is True
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")  # accelerate's FSDP2 spelling of SHARD_GRAD_OP
    assert reshard_after_forward() is False
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD")
    with pytest.raises(ConfigError, match="HYBRID_SHARD"):
        reshard_after_forward()
    one = tether.GRPOConfig(total_episodes=8, rollout_batch_size=4, mini_batch_size=8, micro_batch_size=2,
                            sharding="fsdp")
    apply_launcher_settings(one, 1)
    assert one.sharding == "none"  # nothing to shard over
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # DeepSpeed where the tether config says FSDP: refused
    with pytest.raises(ConfigError, match="DeepSpeed.*sharding: fsdp"):
        apply_launcher_settings(cfg, 2)
