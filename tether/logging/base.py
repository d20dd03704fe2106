"""The ``Logger`` protocol, the fan-out ``MultiLogger`` and ``build_loggers``.

A trainer logs once per optimisation step (DESIGN.md, principle 6: metrics are return values, the loop merges
them and logs once)::

    loggers = build_loggers(cfg.report_to, run_dir, config, is_main_process=rank == 0)
    loggers.log_metrics({"episode": episode, "objective/scores": 0.42, ...}, step=step)
    loggers.log_samples([{"prompt": p, "response": r, "score": s, "kl": k}, ...], step=step)
    loggers.close()

Metric names follow TRL (``objective/kl``, ``policy/clipfrac`` ...) so every backend shows the dashboards a
TRL user already reads. Every backend must tolerate missing keys: a GRPO run logs no ``value/*``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

#: Names accepted in ``report_to``. "jsonl" is always added: the run directory's ``metrics.jsonl`` is what
#: ``tether report``, resumption and the health checks read, so it cannot be switched off.
REPORT_TO_CHOICES: tuple[str, ...] = ("jsonl", "tensorboard", "wandb", "console", "none")

#: Sample columns shown first, in this order, by every sample table; other keys follow in insertion order.
SAMPLE_COLUMNS: tuple[str, ...] = ("prompt", "response", "score", "kl")

#: The per-step KL attribution table (:func:`tether.quality.kl_table_rows`): ``kl_tokens.jsonl``.
KL_TOKENS_TABLE = "kl_tokens"
#: Tables a logger may be given with ``log_table(name, rows, step)``, each a ``<name>.jsonl`` in the run dir.
TABLE_NAMES: tuple[str, ...] = (KL_TOKENS_TABLE,)


@runtime_checkable
class Logger(Protocol):
    """Something that records a run's per-step metrics and sample tables."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record one optimisation step's scalar metrics (TRL names; any subset of keys)."""
        ...

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Record sample rows: ``{"prompt": str, "response": str, "score": float, "kl": float, ...}``."""
        ...

    def close(self) -> None:
        """Flush and release resources. Safe to call twice."""
        ...


class NullLogger:
    """A logger that records nothing (for ``report_to=["none"]`` on a non-main process, and for tests)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Discard the metrics."""

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Discard the samples."""

    def close(self) -> None:
        """Nothing to release."""


class MultiLogger:
    """Fans every call out to several loggers, in order. Implements :class:`Logger`.

    An empty ``MultiLogger`` is a no-op; that is what non-main processes get from :func:`build_loggers`.
    """

    def __init__(self, loggers: Sequence[Logger] = ()) -> None:
        self.loggers: tuple[Logger, ...] = tuple(loggers)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Pass the metrics to every logger."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step)

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Pass the sample rows to every logger."""
        for logger in self.loggers:
            logger.log_samples(rows, step)

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Pass a named table (one of ``TABLE_NAMES``) to every logger that keeps tables (has ``log_table``:
        the JSONL logger); the others skip it, so ``log_table`` is an optional part of :class:`Logger`."""
        if name not in TABLE_NAMES:
            raise ValueError(f"unknown table {name!r}; known tables are {list(TABLE_NAMES)}")
        for logger in self.loggers:
            log_table = getattr(logger, "log_table", None)
            if log_table is not None:
                log_table(name, rows, step)

    def close(self) -> None:
        """Close every logger, even if one of them fails; re-raise the first failure afterwards."""
        first_error: BaseException | None = None
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as err:  # keep closing the others so no file is left unflushed
                first_error = first_error or err
        if first_error is not None:
            raise first_error

    def __enter__(self) -> MultiLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def build_loggers(
    report_to: Sequence[str],
    run_dir: str | Path,
    config: Mapping[str, Any],
    *,
    is_main_process: bool = True,
    console_every: int = 1,
    wandb_project: str = "tether",
    start_step: int | None = None,
) -> MultiLogger:
    """Build the loggers named in ``report_to`` for one run.

    Args:
        report_to: any of ``"jsonl"``, ``"tensorboard"``, ``"wandb"``, ``"console"``, ``"none"`` (TRL's
            ``report_to``). ``"jsonl"`` is always added, even when absent or with ``"none"``: ``tether report``,
            resumption and the health checks read ``metrics.jsonl``.
        run_dir: the run directory; created if missing (main process only).
        config: the run's resolved config, sent to wandb's run config.
        is_main_process: only the main process writes anything; the others get an empty (no-op) MultiLogger,
            so N processes never interleave lines in one file.
        console_every: the console prints one line every this many steps.
        wandb_project: wandb project name.
        start_step: when resuming from a checkpoint taken at this step, lines with a larger step are dropped
            from the JSONL files and purged from TensorBoard before new ones are written.

    Raises:
        ValueError: on a name not in ``REPORT_TO_CHOICES`` (checked on every process, so a typo fails fast).
        ImportError: for ``"wandb"`` when wandb is not installed (the message says how to install it).
    """
    if isinstance(report_to, str):  # a bare "wandb" would otherwise be read as five one-letter names
        report_to = [report_to]
    unknown = [name for name in report_to if name not in REPORT_TO_CHOICES]
    if unknown:
        raise ValueError(f"unknown report_to value(s) {unknown}; valid values are {list(REPORT_TO_CHOICES)}")
    if console_every < 1:
        raise ValueError(f"console_every must be >= 1, got {console_every}")
    if not is_main_process:
        return MultiLogger()

    # Imported here so that ``tether.logging.base`` stays import-light and each backend's dependency is only
    # loaded when it is asked for (TensorBoard pulls in torch.utils.tensorboard; wandb is an optional extra).
    from tether.logging.console import ConsoleLogger
    from tether.logging.jsonl import JsonlLogger

    run_path = Path(run_dir)
    names = set(report_to)
    loggers: list[Logger] = [JsonlLogger(run_path, start_step=start_step)]
    if "tensorboard" in names:
        from tether.logging.tensorboard import TensorBoardLogger

        loggers.append(TensorBoardLogger(run_path, start_step=start_step))
    if "wandb" in names:
        from tether.logging.wandb import WandbLogger

        loggers.append(WandbLogger(run_path, project=wandb_project, config=config))
    if "console" in names:
        loggers.append(ConsoleLogger(every=console_every))
    return MultiLogger(loggers)


def to_float(value: Any) -> float:
    """Coerce a metric value (float, int, 0-d tensor, numpy scalar) to a Python float."""
    if hasattr(value, "item"):  # torch / numpy scalars; avoids importing either here
        value = value.item()
    return float(value)


def sample_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The columns of a sample table: ``SAMPLE_COLUMNS`` present in any row first, then the rest in order."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    seen.pop("step", None)  # the step is the table's caption, not a column
    head = [c for c in SAMPLE_COLUMNS if c in seen]
    return head + [c for c in seen if c not in SAMPLE_COLUMNS]


def format_cell(value: Any, digits: int = 4) -> str:
    """Render one sample-table cell: floats to ``digits`` significant digits, everything else with ``str``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) or hasattr(value, "item"):
        number = to_float(value)
        return f"{number:.{digits}g}" if math.isfinite(number) else str(number)
    return str(value)


def samples_markdown(rows: Sequence[Mapping[str, Any]], max_chars: int = 400) -> str:
    """A Markdown table of sample rows (TensorBoard's text plugin renders it as a table).

    Pipes are escaped and newlines shown as ``⏎`` so a multi-line response stays in one cell; cells longer
    than ``max_chars`` are cut with ``…``.
    """
    columns = sample_columns(rows)
    if not columns:
        return "(no samples)"

    def cell(value: Any) -> str:
        text = format_cell(value).replace("\r\n", "\n").replace("\n", " ⏎ ").replace("|", "\\|")
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
