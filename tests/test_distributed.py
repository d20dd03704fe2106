"""Several processes (torchrun, gloo on CPU) give the one-process result: the update, and whole runs that learn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "distributed_worker.py"


def launch(
    args: list[str], nproc: int, timeout: float = 300, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DIST_TIMEOUT_S": "60"}
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(SCRIPT), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("trainer", ["ppo", "grpo"])
def test_two_processes_update_as_one_process_given_the_same_rollout(tmp_path, trainer):
    """2 processes x half of every mini-batch, gradients summed, equals 1 process x the whole mini-batch."""
    launch(["update", trainer, str(tmp_path / "one")], nproc=1)
    launch(["update", trainer, str(tmp_path / "two")], nproc=2)
    one, two = (torch.load(tmp_path / name / "update.pt") for name in ("one", "two"))
    assert (one["world"], two["world"]) == (1, 2)
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


def test_a_killed_rank_stops_the_job_promptly_and_the_last_checkpoint_is_intact(tmp_path):
    """Rank 1 dies in step 5: the job exits well within the collective timeout, naming rank 1; step 4 loads,
    and the run resumes from it in one process."""
    import time

    from tether.checkpoint import latest_checkpoint, load_state

    start = time.perf_counter()
    done = launch(["kill", "ppo", str(tmp_path)], nproc=2, ok=False)
    assert done.returncode != 0 and time.perf_counter() - start < 120
    report = done.stdout + done.stderr
    assert "rank      : 1" in report or "rank: 1" in report, report[-2000:]
    run = tmp_path / "run"
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step-000004"
    assert load_state(ckpt)["step"] == 4
    assert not (run / "final").exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # The 2-process run resumes in 1 process (checkpoints hold no per-process state) and finishes.
    launch(["resume", "ppo", str(tmp_path)], nproc=1)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)) and (run / "final" / "config.json").is_file()
