"""Fault injection: `tether ppo --resume auto` killed with SIGKILL at random moments, including in the middle of
writing a checkpoint, then rerun each time; the finished run equals an uninterrupted one bit for bit.

The save is slowed with the test hook ``TETHER_TEST_SAVE_SLEEP`` (seconds slept after each file of a checkpoint
is synced), which leaves a wide window in which the temporary directory exists and a kill lands mid-save.
The default run kills three times; the ``slow`` variant eight times, also inside the write of ``final/``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tether.checkpoint import SAVE_SLEEP_ENV, verify_checkpoint
from tether.toy import make_toy_model, make_toy_prompts, make_toy_tokenizer

STEPS = 5
VOLATILE = ("time", "perf/")  # wall-clock stamps and timings differ between runs by nature


def write_toy_inputs(root: Path) -> Path:
    """What a command line run needs, in ``root``: the toy policy (with its tokenizer) in ``policy/``, 16
    prompts in ``prompts.jsonl`` and a reward function ``rewards.py:vowels``. Returns ``root``."""
    tok = make_toy_tokenizer()
    make_toy_model(tok, seed=0).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in make_toy_prompts(16))
    )
    (root / "rewards.py").write_text(
        "def vowels(prompts, responses, **c):\n"
        "    return [sum(x in 'aeiou' for x in r) / max(len(r), 1) for r in responses]\n"
    )
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return write_toy_inputs(tmp_path_factory.mktemp("faults"))


def start(files: Path, out: Path, save_sleep: float | None) -> subprocess.Popen:
    """The same command line every time: `tether ppo ... --resume auto`."""
    argv = [
        sys.executable,
        "-m",
        "tether",
        "ppo",
        "--policy",
        str(files / "policy"),
        "--reward",
        f"{files / 'rewards.py'}:vowels",
        "--prompts",
        str(files / "prompts.jsonl"),
        "--output_dir",
        str(out),
        "--resume",
        "auto",
        "--rollout_batch_size",
        "8",
        "--mini_batch_size",
        "4",
        "--micro_batch_size",
        "4",
        "--total_episodes",
        str(8 * STEPS),
        "--sampling.max_new_tokens",
        "5",
        "--learning_rate",
        "1e-3",
        "--logging.save_steps",
        "1",
        "--logging.save_total_limit",
        "2",
        "--logging.report_to",
        "jsonl",
        "--logging.progress_bar",
        "false",
        "--logging.report",
        "false",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(SAVE_SLEEP_ENV, None)
    if save_sleep is not None:
        env[SAVE_SLEEP_ENV] = str(save_sleep)
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def temp_dirs(out: Path) -> list[Path]:
    return [
        p for d in (out, out / "checkpoints") if d.is_dir() for p in d.iterdir() if p.name.startswith(".tmp-")
    ]


def n_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_for(proc: subprocess.Popen, condition, timeout: float = 120.0) -> bool:
    """Poll ``condition`` until it holds (True) or the process exits by itself (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            return True
        time.sleep(0.01)
    raise AssertionError("the training process made no progress")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def interrupted_run(files: Path, out: Path, moments: list[str], seed: int) -> list[str]:
    """Run, SIGKILLing the process at each of ``moments`` ("mid-save", "mid-final" or "random") in turn, then run
    to the end; returns where each kill landed ("mid-save" when a temporary directory existed at that instant)."""
    rng = random.Random(seed)
    landed = []
    for moment in moments:
        proc = start(files, out, save_sleep=0.05)
        before = n_lines(out / "metrics.jsonl")
        if moment == "random":  # a random instant after the run has made some progress
            hit = wait_for(proc, lambda b=before: n_lines(out / "metrics.jsonl") > b)
            time.sleep(rng.uniform(0.0, 0.8))
        elif moment == "mid-final":
            hit = wait_for(proc, lambda: any(p.name.startswith(".tmp-final") for p in temp_dirs(out)))
        else:
            hit = wait_for(proc, lambda: any(".tmp-step" in p.name for p in temp_dirs(out)))
        if not hit:  # it finished before the moment came: nothing to kill
            assert proc.returncode == 0, proc.communicate()[0]
            landed.append("finished")
            continue
        in_save = bool(temp_dirs(out))
        kill(proc)
        landed.append("mid-save" if in_save else "between saves")
    proc = start(files, out, save_sleep=None)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    return landed


def stable_metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]


def check_equal_to_uninterrupted(files: Path, tmp_path: Path, moments: list[str], seed: int) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = start(files, whole, save_sleep=None)
    assert proc.wait(timeout=300) == 0, proc.communicate()[0]
    landed = interrupted_run(files, cut, moments, seed)
    assert landed.count("mid-save") >= moments.count("mid-save"), landed
    assert stable_metrics(cut) == stable_metrics(whole)
    assert [row["step"] for row in stable_metrics(cut)] == list(range(1, STEPS + 1))
    a, b = (AutoModelForCausalLM.from_pretrained(run / "final").state_dict() for run in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert temp_dirs(cut) == []  # the leftovers of the mid-save kills were cleaned up
    assert verify_checkpoint(cut / "final") is None
    assert [p.name for p in sorted((cut / "checkpoints").iterdir())] == [
        f"step-{STEPS - 1:06d}",
        f"step-{STEPS:06d}",
    ]


def test_sigkill_at_random_moments_and_mid_checkpoint_then_resume_auto_equals_an_uninterrupted_run(
    files, tmp_path
):
    check_equal_to_uninterrupted(files, tmp_path, ["mid-save", "random", "mid-save"], seed=0)


@pytest.mark.slow
def test_many_sigkills_including_inside_the_final_save_equal_an_uninterrupted_run(files, tmp_path):
    moments = ["random", "mid-save", "random", "mid-save", "random", "mid-save", "random", "mid-final"]
    check_equal_to_uninterrupted(files, tmp_path, moments, seed=1)
