"""Run-directory ownership and resume: the lock, run ids, --resume auto, changed inputs, leftover temp dirs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fault_injection import write_toy_inputs
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import tether.checkpoint as ckpt_mod
from tether.checkpoint import STATE_FILE
from tether.cli import main as cli_main
from tether.run import LOCK_FILE, RunDirError, acquire_run_lock, claim_run_dir, read_run_id, release_run_lock
from tether.toy import make_toy_prompts

VOLATILE = ("time", "perf/")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = write_toy_inputs(tmp_path_factory.mktemp("run_dir"))
    rows = [
        {"prompt": p, "chosen": " aeiou", "rejected": f" {'bcdfg'[i % 5]}rst"}
        for i, p in enumerate(make_toy_prompts(32, seed=1))
    ]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def ppo_args(files: Path, out: Path, steps: int = 3, *extra: str) -> list[str]:
    return [
        "ppo",
        "--policy",
        str(files / "policy"),
        "--reward",
        f"{files / 'rewards.py'}:vowels",
        "--prompts",
        str(files / "prompts.jsonl"),
        "--output_dir",
        str(out),
        "--rollout_batch_size",
        "8",
        "--mini_batch_size",
        "8",
        "--micro_batch_size",
        "8",
        "--ppo_epochs",
        "1",
        "--total_episodes",
        str(8 * steps),
        "--sampling.max_new_tokens",
        "4",
        "--learning_rate",
        "1e-3",
        "--logging.report_to",
        "jsonl",
        "--logging.progress_bar",
        "false",
        "--logging.save_steps",
        "1",
        "--logging.report",
        "false",
        "--device",
        "cpu",
        *extra,
    ]


def rm_args(files: Path, out: Path, *extra: str) -> list[str]:
    return [
        "rm",
        "--model",
        str(files / "policy"),
        "--data",
        str(files / "prefs.jsonl"),
        "--output_dir",
        str(out),
        "--batch_size",
        "16",
        "--micro_batch_size",
        "16",
        "--eval_fraction",
        "0",
        "--save_steps",
        "1",
        "--report_to",
        "jsonl",
        "--report",
        "false",
        "--device",
        "cpu",
        *extra,
    ]


def steps_of(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` with its mtime and content hash (what "untouched" means)."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def holder():
    """Start a separate process that holds a run directory's lock, as a live run does; yields its starter."""
    procs: list[subprocess.Popen] = []

    def start(run: Path) -> subprocess.Popen:
        code = (
            "import sys, time; from tether.run import acquire_run_lock; acquire_run_lock(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)"
        )
        proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_writer_and_a_resume_of_a_live_run_are_refused_naming_the_pid(
    files, tmp_path, holder, capsys
):
    run = tmp_path / "run"
    assert cli_main(ppo_args(files, run, 1)) == 0
    before = snapshot(run)
    live = holder(run)
    capsys.readouterr()
    for argv in (
        ["ppo", "--resume", str(run)],
        ppo_args(files, run, 1, "--resume", "auto"),
        ppo_args(files, run, 1, "--overwrite_output_dir", "true"),
    ):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert f"{run} is in use by a live run (PID {live.pid} on " in err, err
    with pytest.raises(RunDirError, match=f"PID {live.pid}"):
        claim_run_dir(run, overwrite=True)
    after = snapshot(run)
    lock = after.pop(LOCK_FILE)
    assert lock != before.pop(LOCK_FILE) and after == before  # only the holder wrote its PID into .lock

    # The holder dies (SIGKILL): the kernel drops its lock, and the next run takes it over.
    live.send_signal(signal.SIGKILL)
    live.wait()
    assert cli_main(["ppo", "--resume", str(run)]) == 0
    assert f"was left locked by PID {live.pid}" in capsys.readouterr().err
    assert (run / LOCK_FILE).read_text() == ""  # released cleanly at the end of the run


def test_resume_into_a_directory_holding_another_run_is_refused_and_touches_nothing(files, tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert cli_main(ppo_args(files, a, 2)) == 0
    assert cli_main(ppo_args(files, b, 2, "--learning_rate", "3e-3")) == 0
    assert read_run_id(a) != read_run_id(b) and read_run_id(a) is not None
    before = snapshot(b)
    capsys.readouterr()
    assert cli_main(["ppo", "--resume", str(a), "--output_dir", str(b)]) == 2
    assert (
        f"cannot resume {a} into output_dir {b}: it holds another run {read_run_id(b)}"
        in capsys.readouterr().err
    )
    assert snapshot(b) == before
    # The library path too: the trainer's own resume, then train() into B.
    import tether

    cfg = tether.PPOConfig(
        output_dir=str(b),
        rollout_batch_size=8,
        mini_batch_size=8,
        micro_batch_size=8,
        total_episodes=16,
        sampling=tether.SamplingConfig(max_new_tokens=4),
        logging=tether.LoggingConfig(report_to=["jsonl"], progress_bar=False, save_steps=1),
    )
    trainer = tether.PPOTrainer(
        cfg,
        policy=str(files / "policy"),
        reward=f"{files / 'rewards.py'}:vowels",
        prompts=str(files / "prompts.jsonl"),
    )
    trainer.resume(a)
    with pytest.raises(RunDirError, match="holds another run"):
        trainer.train()
    assert snapshot(b) == before
    # An empty directory is fine: the run continues there, under the same run id.
    assert cli_main(["ppo", "--resume", str(a), "--output_dir", str(c), "--total_episodes", "24"]) == 0
    assert read_run_id(c) == read_run_id(a) and steps_of(c) == [3]


def test_rm_into_a_used_directory_is_refused_and_a_live_one_names_the_pid(files, tmp_path, holder, capsys):
    run = tmp_path / "rm"
    assert cli_main(rm_args(files, run)) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert cli_main(rm_args(files, run)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(run) == before
    other = tmp_path / "other"
    assert cli_main(rm_args(files, other)) == 0
    assert cli_main(["rm", "--resume", str(run), "--output_dir", str(other)]) == 2
    assert "holds another run" in capsys.readouterr().err
    live = holder(run)
    assert cli_main(["rm", "--resume", str(run)]) == 2
    assert f"in use by a live run (PID {live.pid}" in capsys.readouterr().err


def test_rm_resume_auto_continues_after_the_newest_complete_checkpoint(files, tmp_path, capsys):
    run = tmp_path / "rm"
    assert cli_main(rm_args(files, run, "--resume", "auto")) == 0  # nothing to resume: a new run
    whole = [
        {k: v for k, v in json.loads(line).items() if k != "time"}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    final = AutoModelForSequenceClassification.from_pretrained(run / "final").state_dict()
    newest = sorted((run / "checkpoints").iterdir())[-1]
    (newest / STATE_FILE).write_bytes(b"torn")  # a checkpoint cut short
    capsys.readouterr()
    assert cli_main(rm_args(files, run, "--resume", "auto")) == 0
    captured = capsys.readouterr()
    assert f"checkpoint {newest} is incomplete or corrupt" in captured.err
    assert "resumed from" in captured.out and newest.name not in captured.out
    again = [
        {k: v for k, v in json.loads(line).items() if k != "time"}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert again == whole
    resumed = AutoModelForSequenceClassification.from_pretrained(run / "final").state_dict()
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_resume_auto_starts_afresh_then_resumes_and_refuses_a_finished_run_without_checkpoints(
    files, tmp_path, capsys
):
    run = tmp_path / "run"
    assert cli_main(ppo_args(files, run, 2, "--resume", "auto")) == 0  # no directory yet: a new run
    assert steps_of(run) == [1, 2]
    assert cli_main(ppo_args(files, run, 3, "--resume", "auto")) == 0  # resumed, and run on to step 3
    assert "resumed from" in capsys.readouterr().out and steps_of(run) == [1, 2, 3]
    # An attempt killed before its first checkpoint: its logs are cleared and the run starts afresh.
    cut = tmp_path / "cut"
    assert cli_main(ppo_args(files, cut, 2, "--logging.save_steps", "0")) == 0
    for path in ("final", "checkpoints"):
        ckpt_mod.shutil.rmtree(cut / path, ignore_errors=True)
    assert cli_main(ppo_args(files, cut, 2, "--resume", "auto")) == 0
    assert "starting afresh (removed metrics.jsonl" in capsys.readouterr().err and steps_of(cut) == [1, 2]
    done = tmp_path / "done"
    assert cli_main(ppo_args(files, done, 1, "--logging.save_steps", "0")) == 0
    assert cli_main(ppo_args(files, done, 1, "--logging.save_steps", "0", "--resume", "auto")) == 2
    assert "holds a finished run (final/) and no complete checkpoint" in capsys.readouterr().err


def test_a_prompt_file_that_shrank_is_refused_on_resume_before_anything_is_rewritten(files, tmp_path, capsys):
    run = tmp_path / "run"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text((files / "prompts.jsonl").read_text())
    args = ppo_args(files, run, 2)
    args[args.index("--prompts") + 1] = str(prompts)
    assert cli_main(args) == 0
    prompts.write_text("".join((files / "prompts.jsonl").read_text().splitlines(keepends=True)[:8]))
    before = snapshot(run)
    capsys.readouterr()
    assert cli_main(["ppo", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"the run was trained on 16 prompts and {prompts} now has 8" in err, err
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k != LOCK_FILE} == {
        k: v for k, v in before.items() if k != LOCK_FILE
    }


def test_a_full_disk_ends_the_run_with_one_line_and_the_run_resumes_from_the_last_good_checkpoint(
    files, tmp_path, monkeypatch, capsys
):
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert cli_main(ppo_args(files, whole, 3)) == 0
    real = ckpt_mod._write_bytes

    def full_at_step_2(path: Path, data: bytes) -> None:
        if path.name == STATE_FILE and ".tmp-step-000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_bytes", full_at_step_2)
    capsys.readouterr()
    assert cli_main(ppo_args(files, run, 3)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    root = run / "checkpoints"
    assert err[-1].startswith(
        f"tether ppo: error: disk full while writing checkpoint step 2 to {root}; "
        f"the last good checkpoint is {root / 'step-000001'}; "
    )
    assert [p.name for p in root.iterdir()] == ["step-000001"]  # no temp dir left behind
    monkeypatch.setattr(ckpt_mod, "_write_bytes", real)  # space freed
    assert cli_main(ppo_args(files, run, 3, "--resume", "auto")) == 0
    assert "resumed from" in capsys.readouterr().out
    a, b = (AutoModelForCausalLM.from_pretrained(d / "final").state_dict() for d in (whole, run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [
        [
            {k: v for k, v in json.loads(line).items() if not k.startswith(VOLATILE)}
            for line in (d / "metrics.jsonl").read_text().splitlines()
        ]
        for d in (whole, run)
    ]
    assert rows[0] == rows[1]


def test_leftover_temp_dirs_are_removed_only_when_the_lock_is_taken(tmp_path, capsys):
    run = tmp_path / "run"
    leftovers = [
        run / ".tmp-final-4242",
        run / "checkpoints" / ".tmp-step-000003-4242",
        run / "checkpoints" / ".old-step-000002-4242",
    ]
    for path in leftovers:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"half")
    from tether.run import check_not_live

    check_not_live(run)  # a read-only check removes nothing
    assert all(p.exists() for p in leftovers)
    acquire_run_lock(run)
    try:
        assert not any(p.exists() for p in leftovers)
        assert f"removed {leftovers[0]}, left by an interrupted save" in capsys.readouterr().err
    finally:
        release_run_lock(run)
    assert os.path.getsize(run / LOCK_FILE) == 0


def test_the_lock_file_records_the_holder(tmp_path):
    acquire_run_lock(tmp_path)
    try:
        info = json.loads((tmp_path / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["host"]
    finally:
        release_run_lock(tmp_path)
