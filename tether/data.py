"""Prompt datasets: a list of strings, a ``datasets.Dataset``, or a local JSONL/CSV/Parquet file.

Columns other than ``prompt`` are kept and passed to reward functions by name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class DataError(ValueError):
    """A prompt source that cannot be used, with the file/row/field at fault."""


@dataclass(frozen=True)
class PromptData:
    prompts: list[str]
    columns: dict[str, list[Any]]  # extra columns, each of len(prompts)
    source: str  # where the prompts came from, for error messages

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, indices: Sequence[int]) -> tuple[list[str], dict[str, list[Any]]]:
        prompts = [self.prompts[i] for i in indices]
        cols = {k: [v[i] for i in indices] for k, v in self.columns.items()}
        return prompts, cols


def read_rows_file(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local .jsonl/.json, .csv or .parquet file; errors name the file (and line for JSON)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows
    if suffix in (".csv", ".parquet"):
        # pyarrow (a dependency of datasets) reads both without datasets' on-disk cache.
        import pyarrow.csv
        import pyarrow.parquet

        try:
            table = pyarrow.csv.read_csv(path) if suffix == ".csv" else pyarrow.parquet.read_table(path)
        except Exception as exc:  # noqa: BLE001 - surface the reader's reason with the file name
            raise DataError(f"{path}: could not be read as {suffix[1:]}: {exc}") from None
        return table.to_pylist()
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .parquet")


def load_prompts(source: Any, column: str = "prompt") -> PromptData:
    """Load prompts from a list of strings, a ``datasets.Dataset``, or a file path."""
    if isinstance(source, str | Path) and not (isinstance(source, str) and "\n" in source):
        path = Path(source)
        if not path.exists():
            raise DataError(f"prompt file {path} does not exist")
        rows = read_rows_file(path)
        name = str(path)
    elif isinstance(source, Sequence) and all(isinstance(p, str) for p in source):
        rows = [{column: p} for p in source]
        name = "the prompt list"
    elif hasattr(source, "column_names") and hasattr(source, "__getitem__"):
        if column not in source.column_names:
            raise DataError(
                f"dataset has no {column!r} column; its columns are {', '.join(source.column_names)}"
            )
        rows = [dict(r) for r in source]
        name = "the dataset"
    else:
        raise DataError(f"prompts must be a list of strings, a datasets.Dataset or a file path, got {type(source)}")
    if not rows:
        raise DataError(f"{name} holds no prompts")
    keys = list(rows[0].keys())
    if column not in rows[0]:
        raise DataError(f"{name} has no {column!r} column; its columns are {', '.join(keys) or '(none)'}")
    prompts: list[str] = []
    columns: dict[str, list[Any]] = {k: [] for k in keys if k != column}
    for i, row in enumerate(rows):
        text = row.get(column)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{name}, row {i}: the {column!r} field is empty or not a string ({text!r})")
        prompts.append(text)
        for k in columns:
            columns[k].append(row.get(k))
    return PromptData(prompts, columns, name)


def check_prompt_lengths(data: PromptData, tokenizer: Any, max_prompt_length: int) -> None:
    """Refuse prompts longer than ``max_prompt_length`` tokens, naming the first offending row."""
    lengths = [len(ids) for ids in tokenizer(data.prompts, add_special_tokens=False)["input_ids"]]
    for i, n in enumerate(lengths):
        if n > max_prompt_length:
            raise DataError(
                f"{data.source}, row {i}: prompt is {n} tokens long, more than max_prompt_length={max_prompt_length}"
            )
        if n == 0:
            raise DataError(f"{data.source}, row {i}: prompt encodes to zero tokens")


class PromptSampler:
    """Endless shuffled passes over the prompts, with a generator whose state is checkpointed."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.position = 0

    def next_indices(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.position >= len(self.order):
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
                self.position = 0
            take = min(k - len(out), len(self.order) - self.position)
            out.extend(self.order[self.position : self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = list(state["order"])
        self.position = int(state["position"])
