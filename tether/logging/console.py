"""Console logging: one compact line every N steps, and a compact sample table.

The line shows the two numbers the TRL training FAQ says to watch first — mean reward and objective KL
(keep it roughly within 0..10) — then what explains them::

    step 40  reward 0.6132  kl 3.871  kl_coef 0.04512  entropy 21.37  len 17.25  ep/s 52.18

Lines go through ``tqdm.write`` so they print above a running :class:`tether.logging.progress.Progress` bar
instead of breaking it (and print normally when there is no bar).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tqdm

from tether.logging.base import format_cell, to_float

#: Metric key -> short label, in the order they are printed.
DEFAULT_CONSOLE_KEYS: dict[str, str] = {
    "objective/scores": "reward",
    "objective/kl": "kl",
    "kl/coef": "kl_coef",
    "objective/entropy": "entropy",
    "rollout/response_length": "len",
    "perf/episodes_per_s": "ep/s",
}

#: Width of the score and kl columns of the sample table.
_NUMBER_WIDTH = 8
_SEP = " | "


def format_number(value: float, digits: int = 4) -> str:
    """``value`` to ``digits`` significant digits (``nan`` / ``inf`` spelled out)."""
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def format_metrics_line(metrics: Mapping[str, float], step: int, keys: Mapping[str, str]) -> str:
    """The one-line summary: ``step N`` then ``label value`` for each of ``keys`` present in ``metrics``."""
    parts = [f"step {step}"]
    for key, label in keys.items():
        if key in metrics:
            parts.append(f"{label} {format_number(to_float(metrics[key]))}")
    return "  ".join(parts)


def _fit(text: str, width: int) -> str:
    """One line of exactly ``width`` characters: newlines shown as ``⏎``, cut with ``…``, padded."""
    text = " ".join(text.replace("\r\n", "\n").replace("\n", " ⏎ ").split())
    if len(text) > width:
        text = text[: max(width - 1, 0)] + "…"
    return text.ljust(width)


def format_samples_table(
    rows: Sequence[Mapping[str, Any]],
    step: int,
    width: int,
    max_rows: int = 8,
    numbers: Sequence[str] = ("score", "kl"),
) -> list[str]:
    """Lines of a ``prompt | response | <numbers...>`` table fitted to ``width`` characters.

    The text columns share what the number columns (by default score and kl) leave, 2:3 in favour of the
    response (the part the FAQ says to read: truncated or degenerate generations show there long before
    they show in the metrics).
    """
    n = len(numbers)
    text_width = max(width - n * _NUMBER_WIDTH - (n + 1) * len(_SEP), 10)  # below ~35 columns lines overflow
    prompt_width = max(text_width * 2 // 5, 4)
    response_width = text_width - prompt_width

    def line(prompt: str, response: str, values: Sequence[str]) -> str:
        cells = [_fit(prompt, prompt_width), _fit(response, response_width)]
        cells += [v.rjust(_NUMBER_WIDTH)[:_NUMBER_WIDTH] for v in values]
        return _SEP.join(cells).rstrip()

    out = [f"samples at step {step}:", line("prompt", "response", list(numbers))]
    out.append("-" * min(width, prompt_width + response_width + n * _NUMBER_WIDTH + (n + 1) * len(_SEP)))
    for row in rows[:max_rows]:
        values = [format_cell(row.get(key), digits=4) for key in numbers]
        out.append(line(str(row.get("prompt", "")), str(row.get("response", "")), values))
    if len(rows) > max_rows:
        out.append(f"... {len(rows) - max_rows} more rows in samples.jsonl")
    return out


class ConsoleLogger:
    """Prints a compact metrics line every ``every`` steps and a table when samples are logged.

    Implements ``Logger``.

    Args:
        every: print the metrics line when ``step % every == 0``.
        keys: metric keys to show, with their short labels (a sequence of keys uses the keys as labels).
        write: where lines go; defaults to ``tqdm.write`` (prints above a progress bar without breaking it).
        width: table width in characters; defaults to the terminal width (100 when it cannot be read).
        max_rows: at most this many sample rows are printed per call.
    """

    def __init__(
        self,
        every: int = 1,
        keys: Mapping[str, str] | Sequence[str] | None = None,
        *,
        write: Callable[[str], None] | None = None,
        width: int | None = None,
        max_rows: int = 8,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if keys is None:
            keys = DEFAULT_CONSOLE_KEYS
        self.every = every
        self.keys: dict[str, str] = dict(keys) if isinstance(keys, Mapping) else {k: k for k in keys}
        self._write: Callable[[str], None] = write or tqdm.tqdm.write
        self.width = width
        self.max_rows = max_rows

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Print the one-line summary if ``step`` is a multiple of ``every``."""
        if step % self.every == 0:
            self._write(format_metrics_line(metrics, step, self.keys))

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Print the rows as a table fitted to the terminal width."""
        if not rows:
            return
        width = self.width or shutil.get_terminal_size(fallback=(100, 24)).columns
        self._write("\n".join(format_samples_table(rows, step, width, self.max_rows)))

    def close(self) -> None:
        """Nothing to release."""
