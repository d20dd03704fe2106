"""JSON-lines run logs: ``metrics.jsonl`` and ``samples.jsonl`` in the run directory.

These two files are the run's record of truth: ``tether report``, the health checks and resumption read them,
so the JSONL logger is always on.

Format (one JSON object per line, UTF-8):

- ``metrics.jsonl``: one line per optimisation step,
  ``{"step": int, "episode": int, "time": float, "<metric>": float, ...}``. ``episode`` is written when the
  trainer passes it among the metrics; ``time`` is the Unix time of the call unless the trainer passes its own.
- ``samples.jsonl``: one line per sample row, ``{"step": int, "prompt": str, "response": str, "score": float,
  "kl": float, ...}`` plus whatever extra str/float fields the trainer adds (RL trainers add
  ``high_kl_tokens``, the response's tokens with the highest per-token KL).
- ``<table>.jsonl`` for each table of ``TABLE_NAMES`` a trainer logs, one line per row with its ``"step"``:
  ``kl_tokens.jsonl``, the token types carrying the most KL each step, ``{"step", "rank", "token",
  "token_id", "kl", "share", "count"}`` (:func:`tether.quality.kl_table_rows`).

**Non-finite floats** are written as the JSON *strings* ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (the
spellings JavaScript and ``float()`` use), because bare ``NaN`` is not valid JSON and ``null`` would lose
which of the three it was. :func:`read_jsonl` turns them back into floats for every key except the free-text
fields ``prompt`` and ``response``.

Files are opened in append mode and flushed after every line, so a crash loses at most the line being
written, and a resumed run continues the same files. Resuming from a checkpoint at step ``k`` must first drop
the lines with ``step > k`` (logged after the checkpoint, and about to be logged again): pass
``start_step=k`` or call :meth:`JsonlLogger.truncate_after`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tether.logging.base import TABLE_NAMES, to_float

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"

#: How non-finite floats are spelled in the files (see the module docstring).
NONFINITE_STRINGS: dict[str, float] = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

#: Keys whose string values are free text and are never decoded as non-finite floats.
_TEXT_KEYS = frozenset({"prompt", "response", "token", "high_kl_tokens"})

#: Keys of a metrics line that are integers, not float metrics.
_INT_KEYS = ("step", "episode")


class JsonlFormatError(ValueError):
    """A line of a JSONL file that cannot be read; the message names the file and the 1-based line number."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line


def encode_float(value: float) -> float | str:
    """A float as it is written to JSONL: itself if finite, else ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _encode(value: Any) -> Any:
    """A sample/metric value made JSON-safe: tensors and numpy scalars become floats, non-finite floats strings."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float) or hasattr(value, "item"):
        return encode_float(to_float(value))
    return value


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Undo :func:`encode_float` on one parsed line (free-text ``prompt``/``response`` are left alone)."""
    return {
        key: NONFINITE_STRINGS[value]
        if isinstance(value, str) and key not in _TEXT_KEYS and value in NONFINITE_STRINGS
        else value
        for key, value in record.items()
    }


def read_jsonl(path: str | Path, *, allow_torn_tail: bool = True) -> list[dict[str, Any]]:
    """Read a tether JSONL file into a list of dicts, decoding non-finite floats.

    Blank lines are skipped. Every line must be a JSON object with an integer ``"step"``.

    Args:
        path: the file.
        allow_torn_tail: skip a last line that has no trailing newline and does not parse, i.e. a line whose
            write was cut short by a crash or is still in progress (the logger writes each line, newline
            included, in one call). Any other bad line is an error.

    Raises:
        FileNotFoundError: if the file does not exist.
        JsonlFormatError: on a malformed line, naming the file and the 1-based line number.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    torn_index = len(lines) - 1 if lines and lines[-1] != "" else None  # a last line with no "\n" after it
    records: list[dict[str, Any]] = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if allow_torn_tail and index == torn_index:
                break
            raise JsonlFormatError(
                path, index + 1, f"malformed JSON ({err.msg} at column {err.colno})"
            ) from None
        if not isinstance(record, dict):
            raise JsonlFormatError(path, index + 1, f"expected a JSON object, got {type(record).__name__}")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise JsonlFormatError(path, index + 1, f'missing or non-integer "step" (got {step!r})')
        records.append(decode_record(record))
    return records


def _keep_lines_up_to(path: Path, step: int) -> None:
    """Rewrite ``path`` keeping only lines with ``"step" <= step`` (atomically, via a temporary file)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").split("\n")
    torn_index = len(lines) - 1 if lines and lines[-1] != "" else None
    kept: list[str] = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if index == torn_index:  # cut short by the crash we are resuming from: it is lost anyway
                break
            raise JsonlFormatError(
                path, index + 1, f"malformed JSON ({err.msg} at column {err.colno})"
            ) from None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash here leaves either the old or the new file, never half of one


def _last_step(path: Path) -> int:
    """The step of the last complete line of a JSONL file; 0 when it is missing or has none."""
    if not path.exists():
        return 0
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(step, int):
            return step
    return 0


def _repair_tail(path: Path) -> None:
    """Make sure an existing file ends with a newline before we append, dropping a torn last line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        content = f.read()
        start = content.rfind(b"\n") + 1
        try:
            json.loads(content[start:])
        except ValueError:  # half a line from a crash: appending after it would corrupt the next line too
            f.truncate(start)
            return
        f.seek(0, os.SEEK_END)
        f.write(b"\n")


class JsonlLogger:
    """Writes ``metrics.jsonl`` and ``samples.jsonl`` in ``run_dir``. Implements ``Logger``.

    Args:
        run_dir: the run directory (created if missing).
        start_step: when resuming from a checkpoint taken at this step, drop the lines with a larger step
            from both files before appending (same as calling :meth:`truncate_after` right away).
    """

    def __init__(self, run_dir: str | Path, *, start_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.samples_path = self.run_dir / SAMPLES_FILE
        self._metrics: IO[str] | None = None
        self._samples: IO[str] | None = None
        self._tables: dict[str, IO[str]] = {}  # opened on a table's first row
        if start_step is not None:
            self.truncate_after(start_step)
        else:
            self._open()

    def _open(self) -> None:
        for path in (self.metrics_path, self.samples_path):
            _repair_tail(path)
        # A table never runs ahead of metrics.jsonl (a step logs its metrics first): lines past its last step
        # are left from a run this directory held before (a fresh run removes metrics.jsonl, not the tables).
        last_step = _last_step(self.metrics_path)
        for name in TABLE_NAMES:
            _keep_lines_up_to(self.table_path(name), last_step)
        # Line-buffered text files would flush on "\n" anyway; we flush explicitly so the contract does not
        # depend on buffering settings.
        self._metrics = self.metrics_path.open("a", encoding="utf-8")
        self._samples = self.samples_path.open("a", encoding="utf-8")

    def _close_files(self) -> None:
        for f in (self._metrics, self._samples, *self._tables.values()):
            if f is not None:
                f.close()
        self._metrics = self._samples = None
        self._tables = {}

    def table_path(self, name: str) -> Path:
        """The file of table ``name``: ``run_dir/<name>.jsonl``."""
        return self.run_dir / f"{name}.jsonl"

    def truncate_after(self, step: int) -> None:
        """Drop every line with ``step > step`` from every file (for resuming from a checkpoint at ``step``)."""
        self._close_files()
        for path in (self.metrics_path, self.samples_path, *map(self.table_path, TABLE_NAMES)):
            _keep_lines_up_to(path, step)
        self._open()

    @staticmethod
    def _write(f: IO[str] | None, record: Mapping[str, Any]) -> None:
        if f is None:
            raise ValueError("JsonlLogger is closed")
        # allow_nan=False: every non-finite float has been encoded as a string, so this can only fail on a
        # bug, and then loudly rather than by writing a line other JSON readers reject.
        f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        f.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Append one line ``{"step", "episode"?, "time", <metrics>}`` to ``metrics.jsonl``.

        Raises:
            TypeError: if a metric value is not a number (caught here rather than in the report).
        """
        record: dict[str, Any] = {"step": int(step)}
        if "episode" in metrics:
            record["episode"] = int(metrics["episode"])
        record["time"] = encode_float(to_float(metrics["time"])) if "time" in metrics else time.time()
        for key, value in metrics.items():
            if key in record or key in _INT_KEYS:
                continue
            try:
                record[key] = encode_float(to_float(value))
            except (TypeError, ValueError):
                raise TypeError(f"metric {key!r} is not a number: {value!r}") from None
        self._write(self._metrics, record)

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Append one line per row, ``{"step": step, **row}``, to ``samples.jsonl``."""
        for row in rows:
            record: dict[str, Any] = {"step": int(step)}
            record.update((key, _encode(value)) for key, value in row.items() if key != "step")
            self._write(self._samples, record)

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Append one line per row, ``{"step": step, **row}``, to ``<name>.jsonl`` (``name`` in ``TABLE_NAMES``)."""
        if self._metrics is None:
            raise ValueError("JsonlLogger is closed")
        if name not in self._tables:
            path = self.table_path(name)
            _repair_tail(path)
            self._tables[name] = path.open("a", encoding="utf-8")
        for row in rows:
            record: dict[str, Any] = {"step": int(step)}
            record.update((key, _encode(value)) for key, value in row.items() if key != "step")
            self._write(self._tables[name], record)

    def close(self) -> None:
        """Close every file. Safe to call twice."""
        self._close_files()
