"""Tests for tether.logging: JSONL (NaN encoding, resume truncation), TensorBoard, wandb, console, progress."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest

from tether.logging import (
    REPORT_TO_CHOICES,
    ConsoleLogger,
    JsonlFormatError,
    JsonlLogger,
    Logger,
    MultiLogger,
    NullLogger,
    Progress,
    build_loggers,
    read_jsonl,
    samples_markdown,
)
from tether.logging.console import format_samples_table


def _strict_loads(line: str) -> dict:
    """json.loads that rejects the non-standard NaN/Infinity tokens Python would otherwise accept."""

    def reject(token: str) -> float:
        raise ValueError(f"invalid JSON constant {token}")

    return json.loads(line, parse_constant=reject)


# -- JSONL ---------------------------------------------------------------------------------------------------


def test_jsonl_writes_contract_and_round_trips_nonfinite(tmp_path: Path) -> None:
    logger = JsonlLogger(tmp_path)
    logger.log_metrics(
        {
            "episode": 64,
            "objective/scores": 0.5,
            "objective/kl": math.nan,
            "value/loss": math.inf,
            "lr": -math.inf,
        },
        step=1,
    )
    logger.log_samples(
        [
            {"prompt": "NaN", "response": "Infinity", "score": math.nan, "kl": 0.25, "note": "extra"},
            {"prompt": "p2", "response": "r2", "score": 1.0, "kl": -math.inf},
        ],
        step=1,
    )
    logger.close()

    raw_metrics = [_strict_loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(raw_metrics) == 1
    first = raw_metrics[0]
    assert list(first)[:3] == ["step", "episode", "time"]
    assert first["step"] == 1 and first["episode"] == 64 and isinstance(first["time"], float)
    assert first["objective/kl"] == "NaN" and first["value/loss"] == "Infinity" and first["lr"] == "-Infinity"
    raw_samples = [_strict_loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw_samples] == [1, 1]
    assert raw_samples[0]["score"] == "NaN" and raw_samples[0]["note"] == "extra"

    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert metrics[0]["objective/scores"] == 0.5
    assert math.isnan(metrics[0]["objective/kl"])
    assert metrics[0]["value/loss"] == math.inf and metrics[0]["lr"] == -math.inf
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert math.isnan(samples[0]["score"]) and samples[1]["kl"] == -math.inf
    # Free text that happens to spell a non-finite float stays text.
    assert samples[0]["prompt"] == "NaN" and samples[0]["response"] == "Infinity"


def test_jsonl_accepts_tensor_values_and_rejects_text_metrics(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    logger = JsonlLogger(tmp_path)
    logger.log_metrics({"objective/kl": torch.tensor(2.5)}, step=3)
    with pytest.raises(TypeError, match="objective/scores"):
        logger.log_metrics({"objective/scores": "high"}, step=4)
    logger.close()
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["objective/kl"] == 2.5


def _log_steps(run_dir: Path, steps: range, value: float, *, start_step: int | None = None) -> None:
    logger = JsonlLogger(run_dir, start_step=start_step)
    for step in steps:
        logger.log_metrics({"episode": step * 8, "objective/scores": value}, step)
        if step % 2 == 0:
            logger.log_samples([{"prompt": "p", "response": "r", "score": value, "kl": 0.0}], step)
    logger.close()


def test_jsonl_resume_drops_lines_after_the_checkpoint_step(tmp_path: Path) -> None:
    _log_steps(tmp_path, range(1, 6), value=0.0)  # crashed after step 5, last checkpoint at step 3
    _log_steps(tmp_path, range(4, 7), value=1.0, start_step=3)

    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    assert [r["objective/scores"] for r in metrics] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert [(r["step"], r["score"]) for r in samples] == [(2, 0.0), (4, 1.0), (6, 1.0)]


def test_jsonl_truncate_after_on_an_open_logger(tmp_path: Path) -> None:
    logger = JsonlLogger(tmp_path)
    for step in range(1, 5):
        logger.log_metrics({"objective/kl": float(step)}, step)
    logger.truncate_after(2)
    logger.log_metrics({"objective/kl": 30.0}, 3)
    logger.close()
    assert [(r["step"], r["objective/kl"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
    ]


def test_jsonl_append_after_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "objective/kl": 1.0}\n{"step": 2, "objec')  # a crash mid-write
    assert [r["step"] for r in read_jsonl(path)] == [1]  # a reader of a live/crashed run skips the torn tail
    logger = JsonlLogger(tmp_path)
    logger.log_metrics({"objective/kl": 2.0}, 2)
    logger.close()
    assert [r["step"] for r in read_jsonl(path, allow_torn_tail=False)] == [1, 2]


def test_read_jsonl_names_file_and_line_of_a_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2,, }\n{"step": 3}\n')
    with pytest.raises(JsonlFormatError, match=r"metrics\.jsonl:3: malformed JSON") as info:
        read_jsonl(path)
    assert info.value.line == 3 and info.value.path == path
    path.write_text('{"step": 1}\n{"episode": 2}\n')
    with pytest.raises(JsonlFormatError, match=r":2: missing or non-integer \"step\""):
        read_jsonl(path)


# -- TensorBoard -----------------------------------------------------------------------------------------------


def test_tensorboard_scalars_and_samples_read_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tether.logging import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path)
    for step in range(1, 4):
        logger.log_metrics({"episode": 8 * step, "objective/kl": 0.5 * step, "time": 123.0}, step)
    logger.log_samples([{"prompt": "a|b", "response": "line1\nline2", "score": 1.0, "kl": 0.5}], 3)
    logger.close()
    # Resume from a checkpoint at step 2: step 3 must be replaced, not duplicated.
    resumed = TensorBoardLogger(tmp_path, start_step=2)
    resumed.log_metrics({"episode": 24, "objective/kl": 30.0}, 3)
    resumed.close()

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "time" not in acc.Tags()["scalars"]
    assert [(e.step, e.value) for e in acc.Scalars("objective/kl")] == [(1, 0.5), (2, 1.0), (3, 30.0)]
    assert [e.value for e in acc.Scalars("episode")] == [8.0, 16.0, 24.0]
    text = acc.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| prompt | response | score | kl |" in text and "a\\|b" in text and "line1 ⏎ line2" in text


def test_samples_markdown_escapes_and_truncates() -> None:
    table = samples_markdown(
        [{"step": 1, "prompt": "x|y", "response": "z" * 50, "score": 0.123456}], max_chars=10
    )
    lines = table.splitlines()
    assert lines[0] == "| prompt | response | score |"  # step is not a column; missing kl is not invented
    assert lines[2] == "| x\\|y | zzzzzzzzz… | 0.1235 |"


# -- wandb ---------------------------------------------------------------------------------------------------


def test_wandb_missing_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    from tether.logging.wandb import WandbLogger

    with pytest.raises(ImportError, match=r"pip install wandb.*tether\[wandb\]"):
        WandbLogger(tmp_path, project="p", config={}, mode="offline")
    with pytest.raises(ImportError, match="pip install wandb"):
        build_loggers(["wandb"], tmp_path, {})


def test_wandb_offline_logs_metrics_and_sample_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from tether.logging.wandb import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(tmp_path / "run", project="tether-test", config={"lr": 1e-5}, mode="offline")
    for step in range(1, 4):
        logger.log_metrics({"episode": 8 * step, "objective/kl": 0.5 * step, "time": 1.0}, step)
    logger.log_samples([{"prompt": "hello", "response": "world", "score": 0.75, "kl": 0.5}], 3)
    logger.log_metrics({"objective/kl": 2.0}, 4)  # wandb commits step 3 when step 4 starts
    assert logger.run.summary["objective/kl"] == 1.5
    assert logger.run.summary["episode"] == 24
    assert logger.run.config["lr"] == 1e-5
    logger.close()
    logger.close()  # idempotent

    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    tables = list(offline_runs[0].rglob("samples_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["prompt", "response", "score", "kl"]
    assert table["data"] == [["hello", "world", 0.75, 0.5]]


# -- console and progress ------------------------------------------------------------------------------------


def test_console_prints_one_compact_line_every_n_steps() -> None:
    lines: list[str] = []
    console = ConsoleLogger(every=2, write=lines.append)
    metrics = {
        "objective/scores": 0.123456,
        "objective/kl": 3.45678,
        "kl/coef": 0.0512345,
        "objective/entropy": 21.3456,
        "rollout/response_length": 17.25,
        "perf/episodes_per_s": 52.1789,
        "policy/clipfrac": 0.2,  # not a console key
    }
    console.log_metrics(metrics, step=1)
    assert lines == []
    console.log_metrics(metrics, step=2)
    assert lines == ["step 2  reward 0.1235  kl 3.457  kl_coef 0.05123  entropy 21.35  len 17.25  ep/s 52.18"]
    console.log_metrics({"objective/kl": math.nan}, step=4)  # missing keys are skipped, NaN is shown
    assert lines[-1] == "step 4  kl nan"


def test_console_default_writer_prints_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    ConsoleLogger().log_metrics({"objective/scores": 1.0}, step=7)
    assert capsys.readouterr().out == "step 7  reward 1\n"


def test_console_samples_table_fits_the_width() -> None:
    lines: list[str] = []
    console = ConsoleLogger(write=lines.append, width=70, max_rows=2)
    rows = [{"prompt": "Q: " + "long " * 40, "response": "first\nsecond", "score": 0.5, "kl": 1.25}] * 3
    console.log_samples(rows, step=5)
    table = lines[0].splitlines()
    assert table[0] == "samples at step 5:"
    assert table[1].split(" | ")[0].strip() == "prompt"
    assert all(len(line) <= 70 for line in table)
    assert "first ⏎ second" in table[3] and "0.5" in table[3] and "1.25" in table[3]
    assert table[-1] == "... 1 more rows in samples.jsonl"
    for width in (35, 41, 200):
        assert all(len(line) <= width for line in format_samples_table(rows, 5, width=width))


def test_progress_counts_episodes_and_writes_lines(capsys: pytest.CaptureFixture[str]) -> None:
    bar_output = io.StringIO()
    with Progress(total=100, desc="ppo", file=bar_output, initial=10) as progress:
        progress.update(30, {"objective/scores": 0.51234, "objective/kl": math.nan})
        progress.write("a line above the bar")
        assert progress.n == 40
    assert "ppo" in bar_output.getvalue() and "reward=0.512" in bar_output.getvalue()
    assert "a line above the bar" in capsys.readouterr().out

    quiet_output = io.StringIO()
    quiet = Progress(total=10, desc="quiet", enabled=False, file=quiet_output)
    quiet.update(5)
    quiet.close()
    quiet.close()
    assert quiet_output.getvalue() == ""


# -- build_loggers / MultiLogger -----------------------------------------------------------------------------


def test_build_loggers_rejects_unknown_names_listing_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tensorbord") as info:
        build_loggers(["jsonl", "tensorbord"], tmp_path, {})
    for name in REPORT_TO_CHOICES:
        assert name in str(info.value)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_build_loggers_always_writes_jsonl(tmp_path: Path) -> None:
    loggers = build_loggers(["none"], tmp_path / "run", {"a": 1})
    assert isinstance(loggers, MultiLogger) and isinstance(loggers, Logger)
    loggers.log_metrics({"objective/scores": 2.0}, step=1)
    loggers.close()
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["objective/scores"] == 2.0


def test_build_loggers_fans_out_to_console_and_tensorboard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tensorboard")
    with build_loggers(["console", "tensorboard"], tmp_path, {}, console_every=1) as loggers:
        loggers.log_metrics({"objective/kl": 1.5}, step=1)
    assert capsys.readouterr().out == "step 1  kl 1.5\n"
    assert (tmp_path / "metrics.jsonl").exists()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_non_main_process_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    loggers = build_loggers(["jsonl", "tensorboard", "wandb", "console"], run_dir, {}, is_main_process=False)
    loggers.log_metrics({"objective/kl": 1.0}, step=1)
    loggers.log_samples([{"prompt": "p", "response": "r", "score": 1.0, "kl": 0.0}], step=1)
    loggers.close()
    assert loggers.loggers == ()
    assert not run_dir.exists()
    assert capsys.readouterr().out == ""


def test_multilogger_closes_every_logger_even_if_one_fails() -> None:
    closed: list[str] = []

    class Failing(NullLogger):
        def close(self) -> None:
            closed.append("failing")
            raise RuntimeError("disk full")

    class Recording(NullLogger):
        def close(self) -> None:
            closed.append("recording")

    with pytest.raises(RuntimeError, match="disk full"):
        MultiLogger([Failing(), Recording()]).close()
    assert closed == ["failing", "recording"]
