"""Weights & Biases logging. ``wandb`` is an optional extra: ``pip install 'tether[wandb]'``.

The import is lazy, so tether imports and runs without wandb; only ``report_to=["wandb"]`` needs it. Set
``mode="offline"`` (or ``WANDB_MODE=offline``) to log without a network and ``wandb sync`` later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from tether.logging.base import sample_columns, to_float

WandbMode = Literal["online", "offline", "disabled"]

INSTALL_HINT = "wandb is not installed; run `pip install wandb` (or `pip install 'tether[wandb]'`)"


def import_wandb() -> Any:
    """Import and return the ``wandb`` module, or raise ImportError saying how to install it."""
    try:
        import wandb
    except ImportError as err:
        raise ImportError(f"report_to includes 'wandb' but {INSTALL_HINT}") from err
    return wandb


class WandbLogger:
    """Logs scalars with ``run.log`` and sample rows as a ``wandb.Table``. Implements ``Logger``.

    Args:
        run_dir: the run directory; wandb keeps its local files in ``run_dir/wandb``.
        project: the wandb project.
        config: the run's resolved config, shown as the wandb run config.
        mode: ``"online"``, ``"offline"`` or ``"disabled"``; ``None`` leaves it to wandb (``WANDB_MODE``).
        name: the run's display name; defaults to the run directory's name, as TensorBoard shows it.
        run_id: a wandb run id to resume (``resume="allow"``); ``None`` starts a new wandb run.

    Raises:
        ImportError: if wandb is not installed (the message says how to install it).
    """

    def __init__(
        self,
        run_dir: str | Path,
        project: str = "tether",
        config: Mapping[str, Any] | None = None,
        mode: WandbMode | None = None,
        *,
        name: str | None = None,
        run_id: str | None = None,
    ) -> None:
        self._wandb = import_wandb()
        run_path = Path(run_dir)
        run_path.mkdir(parents=True, exist_ok=True)
        self.run: Any = self._wandb.init(
            project=project,
            dir=str(run_path),
            config=dict(config or {}),
            mode=mode,
            name=name or run_path.name,
            id=run_id,
            resume="allow" if run_id else None,
        )
        self._closed = False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log the metrics at ``step`` (``step`` and ``time`` keys are dropped; wandb records both)."""
        data = {key: to_float(value) for key, value in metrics.items() if key not in ("step", "time")}
        self.run.log(data, step=step)

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Log the rows as a ``wandb.Table`` under the key ``samples``."""
        if not rows:
            return
        columns = sample_columns(rows)
        data = [[_cell(row.get(column)) for column in columns] for row in rows]
        self.run.log({"samples": self._wandb.Table(columns=columns, data=data)}, step=step)

    def close(self) -> None:
        """Finish the wandb run. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self.run.finish()


def _cell(value: Any) -> Any:
    """A table cell wandb accepts: str, int, float or None (tensors and numpy scalars become floats)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "item"):
        return to_float(value)
    return str(value)
