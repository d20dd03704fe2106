"""``sharding: deepspeed`` (DeepSpeed ZeRO-1/2, tether/zero.py) on CPU with gloo: 2 processes give the one-process
update, a checkpoint resumes exactly (under DeepSpeed, and into a whole-model run), and ``accelerate launch`` with
the shipped DeepSpeed config trains and writes a loadable ``final/``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tether
from tether.config import ConfigError
from tether.zero import deepspeed_available

needs_deepspeed = pytest.mark.skipif(
    not deepspeed_available(), reason="deepspeed is not installed (pip install 'tether[deepspeed]')"
)
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
ACCELERATE_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
                  "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
                  "ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION")


def launch(script: str, args: list[str], nproc: int, env: dict[str, str] | None = None) -> None:
    """``script`` under torchrun with ``nproc`` processes (0: a plain process)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DIST_TIMEOUT_S": "60", **(env or {})}
    path = str(TESTS / script)
    cmd = ([sys.executable, path] if nproc == 0 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", path])
    done = subprocess.run(cmd + args, capture_output=True, text=True, env=full_env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@needs_deepspeed
@pytest.mark.parametrize(("trainer", "stage"), [("ppo", 2), ("grpo", 1)])
def test_zero_update_with_two_processes_equals_one_process(tmp_path, trainer, stage):
    """2 processes x half of every mini-batch under a ZeRO engine (AdamW state, and at stage 2 the gradients,
    split over the two) give the weights and statistics of 1 process x the whole mini-batch without DeepSpeed:
    the gradient is the sum over processes and micro-batches (4 micro-batches per process and mini-batch here),
    not DeepSpeed's average. Stage 1 comes from accelerate's environment variable, as `accelerate launch` sets it."""
    launch("distributed_worker.py", ["update", trainer, str(tmp_path / "one")], nproc=0)
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)} if stage == 1 else {}
    launch("distributed_worker.py", ["update", trainer, str(tmp_path / "two"), "deepspeed"], nproc=2, env=env)
    one, two = (torch.load(tmp_path / name / "update.pt") for name in ("one", "two"))
    assert (one["world"], two["world"]) == (1, 2)
    torch.testing.assert_close(two["params"], one["params"], rtol=1e-5, atol=1e-6)
    assert one["stats"].keys() == two["stats"].keys()
    for key, value in one["stats"].items():
        assert two["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@needs_deepspeed
def test_a_zero_checkpoint_resumes_exactly_under_deepspeed_and_in_a_whole_model_run(tmp_path):
    """Update, checkpoint, update (ZeRO-2, 2 processes) = resume from the checkpoint and update, whether the resumed
    run is again ZeRO-2 over 2 processes or one process without DeepSpeed: the checkpoint holds the whole weights and
    AdamW's state gathered from its partitions, keyed by parameter name."""
    from tether.checkpoint import latest_checkpoint, load_state

    launch("deepspeed_worker.py", ["save", str(tmp_path / "a")], nproc=2)
    run = tmp_path / "a" / "run"
    state = load_state(latest_checkpoint(run))
    assert state["optimizer_keys"] == "name" and state["optimizer"]["state"]  # AdamW's moments, whole tensors
    moment = state["optimizer"]["state"]["transformer.wte.weight"]["exp_avg"]
    assert moment.shape[0] == len(tether.toy.make_toy_tokenizer()) and moment.abs().sum() > 0
    launch("deepspeed_worker.py", ["resume", str(tmp_path / "b"), str(run), "deepspeed"], nproc=2)
    launch("deepspeed_worker.py", ["resume", str(tmp_path / "c"), str(run), "none"], nproc=0)
    a, b, c = (torch.load(tmp_path / name / "weights.pt") for name in "abc")
    assert (b["world"], b["zero"], c["world"], c["zero"]) == (2, True, 1, False)
    assert any(not torch.equal(a["first"][k], a["second"][k]) for k in a["first"])  # the second update moved them
    for resumed in (b, c):
        torch.testing.assert_close(resumed["resumed"], a["first"], rtol=0, atol=0)
    torch.testing.assert_close(b["second"], a["second"], rtol=0, atol=0)  # the same engine, the same numbers
    torch.testing.assert_close(c["second"], a["second"], rtol=1e-5, atol=1e-6)  # a whole-model AdamW


@needs_deepspeed
def test_accelerate_launch_with_the_shipped_deepspeed_config_trains_and_saves_a_loadable_model(tmp_path):
    """`accelerate launch --config_file examples/accelerate/deepspeed-zero2.yaml -m tether grpo ...` (made a
    2-process CPU config): the run reads DeepSpeed and its ZeRO stage from accelerate's environment, trains, and
    final/ loads with from_pretrained."""
    import yaml
    from transformers import AutoModelForCausalLM

    from tether.toy import make_toy_model, make_toy_prompts, make_toy_tokenizer

    shipped = yaml.safe_load((ROOT / "examples/accelerate/deepspeed-zero2.yaml").read_text())
    assert shipped["distributed_type"] == "DEEPSPEED" and shipped["deepspeed_config"]["zero_stage"] == 2
    shipped.update(use_cpu=True, num_processes=2, mixed_precision="no")
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(shipped))
    tok = make_toy_tokenizer()
    torch.manual_seed(0)
    initial = make_toy_model(tok)
    initial.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in make_toy_prompts(16)))
    (tmp_path / "reward.py").write_text("def vowels(prompts, responses, **kw):\n"
                                        "    return [sum(c in 'aeiou' for c in r) / max(len(r), 1) for r in responses]\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "ds.yaml"),
           "--main_process_port", "0",
           "-m", "tether", "grpo", "--policy", str(tmp_path / "policy"), "--reward", f"{tmp_path}/reward.py:vowels",
           "--prompts", str(tmp_path / "prompts.jsonl"), "--output_dir", str(tmp_path / "run"),
           "--total_episodes", "8", "--rollout_batch_size", "4", "--num_generations", "2", "--mini_batch_size", "8",
           "--micro_batch_size", "2", "--learning_rate", "1e-2", "--sampling.max_new_tokens", "6", "--device", "cpu",
           "--logging.progress_bar", "false", "--logging.save_steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DIST_TIMEOUT_S": "60"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tether: sharding=deepspeed (accelerate DeepSpeed config)" in done.stderr
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["sharding"], saved["zero_stage"]) == ("deepspeed", 2)
    assert done.stdout.count("final model:") == 1  # one process writes
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(row["numerics/skipped_updates"] == 0 for row in rows)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert final.num_parameters() == initial.num_parameters()
    before = initial.state_dict()
    assert any(not torch.equal(w, before[k]) for k, w in final.state_dict().items())  # trained
    ckpt = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-000002" / "policy")
    torch.testing.assert_close(ckpt.state_dict(), final.state_dict(), rtol=0, atol=0)


def test_deepspeed_settings_come_from_accelerates_environment(monkeypatch, tmp_path):
    """A DeepSpeed accelerate config turns sharding to deepspeed with its ZeRO stage (from the variable or from the
    DeepSpeed JSON file it names); ZeRO-3, offload, fp16, micro_batch_tokens and an FSDP tether config are refused
    with advice. Without a process group it falls back to sharding: none, as FSDP does."""
    from tether.sharding import apply_launcher_settings

    for name in ACCELERATE_ENV:
        monkeypatch.delenv(name, raising=False)

    def config(**kw):
        return tether.GRPOConfig(total_episodes=8, rollout_batch_size=4, mini_batch_size=8, micro_batch_size=2, **kw)

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    if not deepspeed_available():
        with pytest.raises(ConfigError, match="pip install"):
            apply_launcher_settings(config(), 2)
        return
    cfg = config()
    assert apply_launcher_settings(cfg, 2) == ["sharding=deepspeed (accelerate DeepSpeed config)"]
    assert (cfg.sharding, cfg.zero_stage) == ("deepspeed", 2)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    cfg = config()
    assert len(apply_launcher_settings(cfg, 2)) == 2 and cfg.zero_stage == 1
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": "auto"}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    cfg = config()
    apply_launcher_settings(cfg, 2)
    assert cfg.zero_stage == 1
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="ZeRO stage 3.*fsdp"):
        apply_launcher_settings(config(), 2)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(ConfigError, match="offload"):
        apply_launcher_settings(config(), 2)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")
    for bad, match in ((dict(mixed_precision="fp16"), "fp16"), (dict(micro_batch_tokens=64), "micro_batch_tokens"),
                       (dict(sharding="fsdp"), "sharding: fsdp")):
        with pytest.raises(ConfigError, match=match):
            apply_launcher_settings(config(**bad), 2)
    cfg = config()
    apply_launcher_settings(cfg, 1, has_group=False)
    assert cfg.sharding == "none"  # nothing to shard over
    with pytest.raises(ConfigError, match="zero_stage must be 1 or 2"):
        config(zero_stage=3)
    from tether.trainers.reward import RewardConfig, RewardTrainer

    with pytest.raises(ConfigError, match="tether rm does not run under DeepSpeed"):
        RewardTrainer(RewardConfig())
