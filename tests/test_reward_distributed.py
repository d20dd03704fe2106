"""``tether rm`` under torchrun (2 processes, gloo on CPU) gives the one-process run: weights, metrics, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_reward_trainer import synthetic_pairs, write_jsonl
from test_rewards_helpers import gpt_tokenizer, tiny_gpt2_lm

from tether.backend import SingleProcess, rank_slice
from tether.config import ConfigError
from tether.logging import read_jsonl
from tether.trainers import reward as reward_module
from tether.trainers.reward import RewardConfig, RewardTrainer, pair_share

SCRIPT = Path(__file__).resolve().parent / "reward_worker.py"
STEPS = list(range(1, 9))  # reward_worker.SETTINGS: 2 epochs of 4 steps


def launch(jobs: list[list[str]], nproc: int, timeout: float = 120) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DIST_TIMEOUT_S": "60"}
    cmd = [sys.executable, str(SCRIPT), json.dumps(jobs)]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def cut_at_step_3(run: Path, copy: Path) -> list[str]:
    """A copy of ``run`` as a run stopped after its step-3 checkpoint (mid-epoch, before the 1-pair batch);
    the job that resumes it with ``tether rm --resume``."""
    shutil.copytree(run, copy)
    for name in ("checkpoints/step-000006", "final", "report.html"):
        shutil.rmtree(copy / name) if (copy / name).is_dir() else (copy / name).unlink()
    return ["cli", "--resume", str(copy)]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def assert_same_metrics(got: list[dict], expected: list[dict]) -> None:
    """The same records, step by step and key by key, within float tolerance (``time`` is wall-clock)."""
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for g, e in zip(got, expected, strict=True):
        keys = e.keys() - {"time"}
        assert g.keys() - {"time"} == keys, e["step"]
        for key in keys:
            assert g[key] == pytest.approx(e[key], rel=1e-5, abs=1e-7), (e["step"], key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The same data, model and seed trained by 1 and by 2 processes, and each run resumed from its step-3
    checkpoint by the other number of processes (three launches: an interpreter start costs more than a run)."""
    root = tmp_path_factory.mktemp("rm")
    tok = gpt_tokenizer()
    model_dir = root / "lm"
    tiny_gpt2_lm(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_jsonl(root / "train.jsonl", synthetic_pairs(13, 0))  # type: ignore[arg-type]
    eval_data = write_jsonl(root / "eval.jsonl", synthetic_pairs(5, 1))  # type: ignore[arg-type]
    one, two = root / "one", root / "two"
    launch([["train", str(one), str(model_dir), data, eval_data]], nproc=1)
    resume_in_two = cut_at_step_3(one / "run", root / "resumed-by-2")
    launch([["train", str(two), str(model_dir), data, eval_data], resume_in_two], nproc=2)
    launch([cut_at_step_3(two / "run", root / "resumed-by-1")], nproc=1)
    return SimpleNamespace(root=root, one=one, two=two)


def test_two_processes_train_the_weights_and_log_the_metrics_of_one(runs: SimpleNamespace) -> None:
    one, two = torch.load(runs.one / "rank-0.pt"), torch.load(runs.two / "rank-0.pt")
    assert (one["world"], two["world"]) == (1, 2)
    assert_same_weights(final_weights(runs.two / "run"), final_weights(runs.one / "run"))
    torch.testing.assert_close(two["params"], one["params"], rtol=1e-5, atol=1e-6)
    # the metrics: train/loss, accuracy, grad_norm, learning rate, epoch, and the evaluations at 3, 6 and 8
    one_records, two_records = (read_jsonl(r / "run" / "metrics.jsonl") for r in (runs.one, runs.two))
    assert [r["step"] for r in two_records] == STEPS  # one writer: every step once
    assert [r["step"] for r in two_records if "eval/accuracy" in r] == [3, 6, 8]
    assert_same_metrics(two_records, one_records)
    assert_same_metrics(two["history"], one["history"])
    # every process holds the same model and returns the same history
    rank1 = torch.load(runs.two / "rank-1.pt")
    assert torch.equal(rank1["params"], two["params"])
    assert rank1["history"] == two["history"]
    # rank 0 alone wrote the run directory's outputs
    run = runs.two / "run"
    assert (run / "final" / "config.json").is_file() and (run / "report.html").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]


def test_the_weights_moved_well_beyond_the_tolerance(runs: SimpleNamespace) -> None:
    # Without this, "1 and 2 processes agree" would also hold for a run that did not train at all.
    start = load_file(runs.root / "lm" / "model.safetensors")
    trained = final_weights(runs.one / "run")
    shared = [k for k in trained if k in start]
    assert shared
    assert max((trained[k] - start[k]).abs().max().item() for k in shared) > 1e-3


@pytest.mark.parametrize("name", ["resumed-by-2", "resumed-by-1"])
def test_a_run_resumes_under_another_process_count(runs: SimpleNamespace, name: str) -> None:
    """``tether rm --resume`` of the 1-process run's step-3 checkpoint in 2 processes, and of the 2-process
    run's in 1, finishes the run exactly as the uninterrupted one (checkpoints hold no per-process state)."""
    run = runs.root / name
    assert_same_weights(final_weights(run), final_weights(runs.one / "run"))
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == STEPS  # steps 4-8 dropped and logged again, once
    assert_same_metrics(records, read_jsonl(runs.one / "run" / "metrics.jsonl"))


@pytest.mark.parametrize(
    ("world", "batch", "micro", "message"),
    [
        (4, 6, 2, r"batch_size \(6\) must be divisible by the number of processes \(4\)"),
        (2, 8, 8, r"each of the 2 processes takes 4 of the batch_size of 8 pairs.*micro_batch_size \(8\)"),
    ],
)
def test_a_batch_size_that_does_not_split_over_the_processes_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world: int, batch: int, micro: int, message: str
) -> None:
    # Rank 0 of `world` processes, without starting them: the check runs before any collective.
    backend = SingleProcess()
    backend.world_size = world
    monkeypatch.setattr(reward_module, "make_backend", lambda: backend)
    tok = gpt_tokenizer()
    cfg = RewardConfig(
        output_dir=str(tmp_path / "run"), batch_size=batch, micro_batch_size=micro, device="cpu"
    )
    with pytest.raises(ConfigError, match=message):
        RewardTrainer(cfg, model=tiny_gpt2_lm(tok), tokenizer=tok, train_data=synthetic_pairs(8, 0))
    # a batch that splits into whole micro-batches is accepted
    cfg.batch_size, cfg.micro_batch_size = 4 * world, 2
    RewardTrainer(cfg, model=tiny_gpt2_lm(tok), tokenizer=tok, train_data=synthetic_pairs(8, 0))


def test_pair_shares_cover_a_batch_once_and_equal_rank_slice_when_it_divides() -> None:
    for world in (1, 2, 3, 4):
        for n in range(10):
            shares = [range(n)[pair_share(n, rank, world)] for rank in range(world)]
            assert [i for share in shares for i in share] == list(range(n)), (n, world)
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            if n % world == 0:
                assert all(pair_share(n, r, world) == rank_slice(n, r, world, "n") for r in range(world))
