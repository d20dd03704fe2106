"""SIGINT / SIGTERM: the run finishes its step, writes a checkpoint, flushes its logs and exits 130 / 143 with the
command that resumes it; a second signal stops at once and leaves the last checkpoint intact. The resumed run equals
an uninterrupted one. The signals are real: the reward function sends them to its own process mid-step."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from test_fault_injection import write_toy_inputs
from transformers import AutoModelForCausalLM

import tether
from tether.checkpoint import latest_checkpoint, verify_checkpoint
from tether.cli import main
from tether.stop import RunStopped

STEPS = 6
VOLATILE = ("time", "perf/")

REWARD = '''
import os, signal
from pathlib import Path

MARK = Path(__file__).with_name("signalled")
calls = []

def vowels(prompts, responses, **columns):
    calls.append(1)
    if len(calls) == 3 and not MARK.exists() and os.environ.get("SEND"):
        MARK.touch()  # once per test: the resumed process trains on undisturbed
        for _ in range(int(os.environ.get("TIMES", "1"))):
            os.kill(os.getpid(), getattr(signal, os.environ["SEND"]))
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]
'''


@pytest.fixture
def files(tmp_path: Path) -> Path:
    write_toy_inputs(tmp_path)
    (tmp_path / "rewards.py").write_text(REWARD)  # vowels that also sends the test's signal
    return tmp_path


def argv(files: Path, out: Path, command: str = "ppo", save_steps: int = 50) -> list[str]:
    return [command, "--policy", str(files / "policy"), "--reward", f"{files / 'rewards.py'}:vowels",
            "--prompts", str(files / "prompts.jsonl"), "--output_dir", str(out), "--resume", "auto",
            "--rollout_batch_size", "8", "--mini_batch_size", "4", "--micro_batch_size", "4",
            "--total_episodes", str(8 * STEPS), "--sampling.max_new_tokens", "5", "--learning_rate", "1e-3",
            "--logging.save_steps", str(save_steps), "--logging.report_to", "jsonl",
            "--logging.progress_bar", "false", "--logging.report", "false", "--device", "cpu"]


def stable_metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]


def same_weights(a: Path, b: Path) -> bool:
    x, y = (AutoModelForCausalLM.from_pretrained(run / "final").state_dict() for run in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize(("command", "name", "code"), [("ppo", "SIGINT", 130), ("grpo", "SIGTERM", 143)])
def test_a_signal_before_the_first_checkpoint_saves_the_step_and_resume_equals_an_uninterrupted_run(
    files, tmp_path, monkeypatch, capsys, command, name, code
):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(argv(files, whole, command)) == 0
    monkeypatch.setenv("SEND", name)
    assert main(argv(files, cut, command)) == code
    err = capsys.readouterr().err
    assert f"{name} received: finishing this step" in err
    assert f"stopped by {name} after step 3" in err and f"tether {command} --resume {cut}" in err
    assert "Traceback" not in err
    ckpt = latest_checkpoint(cut)
    assert ckpt.name == "step-000003" and verify_checkpoint(ckpt) is None  # save_steps is 50: the stop saved it
    assert [row["step"] for row in stable_metrics(cut)] == [1, 2, 3]  # the logs were flushed
    assert not (cut / "final").exists()
    # the same command again (--resume auto) continues from step 3 and ends as the uninterrupted run did
    assert main(argv(files, cut, command)) == 0
    assert stable_metrics(cut) == stable_metrics(whole)
    assert same_weights(whole, cut)


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv("SEND", "SIGINT")
    monkeypatch.setenv("TIMES", "2")
    assert main(argv(files, out, save_steps=1)) == 130
    err = capsys.readouterr().err
    assert "interrupted; the last complete checkpoint is kept" in err and "stopped by" not in err
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step-000002" and verify_checkpoint(ckpt) is None  # step 3 never finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers were given back
    assert main(argv(files, out, save_steps=1)) == 0  # and the run goes on from step 2
    assert [row["step"] for row in stable_metrics(out)] == list(range(1, STEPS + 1))


def test_the_reward_model_trainer_stops_on_sigterm_with_a_checkpoint_and_resumes(tmp_path, monkeypatch):
    from test_reward_trainer import resumable_trainer

    import tether.trainers.reward as reward_module

    real, calls = reward_module.clip_gradients, []

    def clip_and_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    full = resumable_trainer(tmp_path, "full")
    full_records = full.train()
    monkeypatch.setattr(reward_module, "clip_gradients", clip_and_signal)
    cut = resumable_trainer(tmp_path, "cut")
    with pytest.raises(RunStopped) as stopped:
        cut.train()
    assert stopped.value.exit_code == 143 and stopped.value.step == 2
    assert latest_checkpoint(cut.run_dir).name == "step-000002"
    monkeypatch.setattr(reward_module, "clip_gradients", real)
    resumed = resumable_trainer(tmp_path, "cut")
    resumed.resume()
    resumed.train()
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]  # noqa: E731
    lines = [json.loads(x) for x in (cut.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert strip(lines) == strip(full_records)
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_stop_signals_outside_a_run_leave_the_handlers_alone():
    before = signal.getsignal(signal.SIGTERM)
    with tether.stop.StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert signal.getsignal(signal.SIGTERM) is before
