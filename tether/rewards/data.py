"""Preference pairs and scored samples from JSONL/CSV/Parquet files, ``datasets.Dataset`` or lists of dicts.

Two preference layouts are accepted (the two TRL uses):

* explicit prompt: ``prompt``, ``chosen``, ``rejected`` (and optionally ``margin``); texts are prompt + answer;
* full text: ``chosen`` and ``rejected`` only, each the whole conversation (the prompt is taken as "").

Every problem is reported with the source (file name) and the row index, so that a bad row in a 100k-line
file can be found.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tether.data import DataError, read_rows_file


@dataclass(frozen=True)
class PreferenceData:
    """B preference pairs. ``margins`` is None unless margins were asked for."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    margins: list[float] | None
    source: str

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def chosen_texts(self) -> list[str]:
        """[B] full texts ``prompt + chosen`` (what the reward model scores)."""
        return [p + c for p, c in zip(self.prompts, self.chosen, strict=True)]

    @property
    def rejected_texts(self) -> list[str]:
        """[B] full texts ``prompt + rejected``."""
        return [p + r for p, r in zip(self.prompts, self.rejected, strict=True)]


def read_rows(source: Any) -> tuple[list[dict[str, Any]], str]:
    """Rows and a name for errors from a file path (.jsonl/.json/.csv/.parquet), a Dataset or a list of dicts."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise DataError(f"data file {path} does not exist")
        return read_rows_file(path), path
    if hasattr(source, "column_names") and hasattr(source, "to_list"):
        return list(source.to_list()), "the dataset"
    if isinstance(source, Sequence) and all(isinstance(row, Mapping) for row in source):
        return [dict(row) for row in source], "the rows"
    raise DataError(
        f"data must be a file path, a datasets.Dataset or a list of dicts, got {type(source).__name__}"
    )


def _require_columns(rows: list[dict[str, Any]], name: str, needed: Sequence[str]) -> None:
    if not rows:
        raise DataError(f"{name} holds no rows")
    for i, row in enumerate(rows):
        missing = [c for c in needed if c not in row]
        if missing:
            raise DataError(
                f"{name}, row {i}: missing column(s) {', '.join(map(repr, missing))}; "
                f"found {', '.join(map(repr, row)) or '(none)'}"
            )


def _text(row: dict[str, Any], key: str, name: str, i: int, allow_empty: bool) -> str:
    value = row[key]
    if not isinstance(value, str):
        hint = " (conversational data: apply the chat template first)" if isinstance(value, list) else ""
        raise DataError(f"{name}, row {i}: {key!r} must be a string, got {type(value).__name__}{hint}")
    if not allow_empty and not value.strip():
        raise DataError(f"{name}, row {i}: {key!r} is empty")
    return value


def load_preferences(source: Any, *, use_margin: bool = False) -> PreferenceData:
    """Load and validate preference pairs (see the module docstring for the layouts).

    Raises ``DataError`` naming the source and row for a missing column, an empty or non-string text,
    ``chosen == rejected`` (a pair that teaches nothing and usually means a broken export), or a margin that is
    not a finite number.
    """
    rows, name = read_rows(source)
    has_prompt = bool(rows) and "prompt" in rows[0]
    _require_columns(rows, name, ["prompt", "chosen", "rejected"] if has_prompt else ["chosen", "rejected"])
    if use_margin:
        _require_columns(rows, name, ["margin"])
    prompts, chosen, rejected, margins = [], [], [], []
    for i, row in enumerate(rows):
        prompt = _text(row, "prompt", name, i, allow_empty=True) if has_prompt else ""
        good = _text(row, "chosen", name, i, allow_empty=False)
        bad = _text(row, "rejected", name, i, allow_empty=False)
        if good == bad:
            raise DataError(f"{name}, row {i}: 'chosen' and 'rejected' are identical")
        if use_margin:
            margin = row["margin"]
            if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not math.isfinite(margin):
                raise DataError(f"{name}, row {i}: 'margin' must be a finite number, got {margin!r}")
            margins.append(float(margin))
        prompts.append(prompt)
        chosen.append(good)
        rejected.append(bad)
    return PreferenceData(prompts, chosen, rejected, margins if use_margin else None, name)


def split_indices(n_rows: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random split of ``range(n_rows)`` into sorted (train, eval) row lists.

    The eval part has ``max(1, round(eval_fraction * n_rows))`` rows.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n_eval = max(1, round(eval_fraction * n_rows))
    if n_eval >= n_rows:
        raise DataError(f"{n_rows} pairs are too few to hold out {n_eval} for evaluation")
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def load_samples(source: Any) -> tuple[list[str], list[str], dict[str, list[Any]]]:
    """(prompt, response) samples and their other columns, e.g. reference-policy generations to normalise on."""
    rows, name = read_rows(source)
    _require_columns(rows, name, ["prompt", "response"])
    prompts = [_text(row, "prompt", name, i, allow_empty=True) for i, row in enumerate(rows)]
    responses = [_text(row, "response", name, i, allow_empty=True) for i, row in enumerate(rows)]
    others = [k for k in rows[0] if k not in ("prompt", "response")]
    columns = {k: [row.get(k) for row in rows] for k in others}
    return prompts, responses, columns
