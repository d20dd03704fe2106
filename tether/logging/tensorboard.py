"""TensorBoard logging through ``torch.utils.tensorboard.SummaryWriter``.

Event files go to ``run_dir/tensorboard/`` so ``tensorboard --logdir runs/`` shows every run by its directory
name without mixing event files into the run directory itself. Scalars keep their TRL names (TensorBoard
groups them by the prefix before ``/``: objective, policy, value, kl, rollout, perf, time). Sample rows are
logged as a Markdown table under the text tag ``samples``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tether.logging.base import samples_markdown, to_float

TENSORBOARD_SUBDIR = "tensorboard"

#: Keys of a metrics mapping that are bookkeeping, not curves (the step is TensorBoard's x axis).
_SKIP_KEYS = frozenset({"step", "time"})


class TensorBoardLogger:
    """Writes scalars and sample tables to ``run_dir/tensorboard``. Implements ``Logger``.

    Args:
        run_dir: the run directory.
        start_step: when resuming from a checkpoint at this step, events with a larger step already in the
            directory are hidden (SummaryWriter's ``purge_step``), matching ``JsonlLogger(start_step=...)``.
        flush_secs: how often the writer flushes to disk.
    """

    def __init__(self, run_dir: str | Path, *, start_step: int | None = None, flush_secs: int = 30) -> None:
        # Imported here: torch.utils.tensorboard needs the ``tensorboard`` package and costs ~1 s to import.
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / TENSORBOARD_SUBDIR
        self._writer: Any = SummaryWriter(
            log_dir=str(self.log_dir),
            purge_step=None if start_step is None else start_step + 1,
            flush_secs=flush_secs,
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Add every metric as a scalar at ``step`` (``time`` is skipped; TensorBoard records wall time)."""
        for key, value in metrics.items():
            if key not in _SKIP_KEYS:
                self._writer.add_scalar(key, to_float(value), global_step=step)

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Add the rows as one Markdown table under the text tag ``samples``."""
        if rows:
            self._writer.add_text("samples", samples_markdown(rows), global_step=step)

    def flush(self) -> None:
        """Write pending events to disk now."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file. Safe to call twice."""
        self._writer.close()
