"""Prompt datasets: a list, a ``datasets.Dataset``, or a local JSONL/CSV/Parquet file.

A prompt is a string, or a conversation: a list of chat messages ``[{"role": "user", "content": "..."}]``
as in TRL's conversational datasets, turned into text by :func:`render_prompts` with the tokenizer's chat
template. Columns other than ``prompt`` are kept and passed to reward functions by name.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class DataError(ValueError):
    """A prompt source that cannot be used, with the file/row/field at fault."""


Message = dict[str, Any]

#: The column :func:`render_prompts` stores the raw conversations in, for reward functions to read by name.
MESSAGES_COLUMN = "prompt_messages"


@dataclass(frozen=True)
class PromptData:
    """Prompts and their extra columns, in one of three states.

    - Plain text: ``prompts`` are the policy's inputs, ``messages`` is None, ``chat`` is False.
    - Conversational, as loaded: ``messages`` holds each row's conversation and ``prompts`` a readable
      stand-in, the content of the row's last user message (of its last message when none is from the
      user). The stand-in serves ``len``, display and error messages, never generation:
      :func:`check_prompt_lengths` refuses data in this state until :func:`render_prompts` has run.
    - Rendered by :func:`render_prompts`: ``prompts`` are the chat-template texts, the conversations are
      also the column ``prompt_messages``, and ``chat`` is True. The texts already carry the template's
      special tokens (BOS, role markers), so whoever tokenises them must pass ``add_special_tokens=False``.
    """

    prompts: list[str]
    columns: dict[str, list[Any]]  # extra columns, each of len(prompts)
    source: str  # where the prompts came from, for error messages
    messages: list[list[Message]] | None = None  # the raw conversations when the data is conversational
    chat: bool = False  # prompts are rendered chat-template text: tokenise with add_special_tokens=False

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, indices: Sequence[int]) -> tuple[list[str], dict[str, list[Any]]]:
        prompts = [self.prompts[i] for i in indices]
        cols = {k: [v[i] for i in indices] for k, v in self.columns.items()}
        return prompts, cols


def read_rows_file(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local .jsonl/.json, .csv or .parquet file; errors name the file (and the line for text files).

    Text files must be UTF-8 (an invalid byte is reported with its line and byte offset). A CSV file is also
    checked for broken quoting before it is parsed (see :func:`check_csv_quoting`).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, _read_utf8(path))
    if suffix in (".csv", ".parquet"):
        # pyarrow (a dependency of datasets) reads both without datasets' on-disk cache.
        import pyarrow.csv
        import pyarrow.parquet

        if suffix == ".csv":
            check_csv_quoting(_read_utf8(path), str(path))
        try:
            table = pyarrow.csv.read_csv(path) if suffix == ".csv" else pyarrow.parquet.read_table(path)
        except Exception as exc:  # noqa: BLE001 - surface the reader's reason with the file name
            raise DataError(f"{path}: could not be read as {suffix[1:]}: {exc}") from None
        return table.to_pylist()
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .parquet")


def _read_utf8(path: Path) -> str:
    """The text of ``path``; a byte that is not UTF-8 is named with its line and offset."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}, line {line} (byte {exc.start}): not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _read_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    """One JSON object per non-blank line."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
            raise DataError(f"{path}, line {lineno}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
        except RecursionError:
            raise DataError(f"{path}, line {lineno}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def check_csv_quoting(text: str, name: str) -> None:
    """Refuse CSV text whose quoting is broken, naming the line where the bad quote opens.

    Two symptoms: a quote that is never closed (the rest of the file would be one field), and a quoted field
    that spans several lines of which one, read alone, has exactly the header's number of fields - a row
    swallowed by a quote opened earlier (a stray ``"`` at the start of a field), which a CSV reader takes as one
    long prompt. A multi-line field whose lines do not look like rows passes; a file with one column is only
    checked for the unclosed quote.
    """
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    last_line = 0
    try:
        for row in reader:
            first, last_line = last_line + 1, reader.line_num
            if header is None:
                header = row
            elif last_line > first and len(header) > 1:
                _check_multiline_row(row, len(header), first, last_line, name)
    except csv.Error as exc:
        what = "a quote opened in this row is never closed" if "end of data" in str(exc) else str(exc)
        raise DataError(
            f'{name}, line {last_line + 1}: broken CSV quoting: {what}; a field holding a " must be quoted, '
            'with the quote doubled ("")'
        ) from None


def _check_multiline_row(row: list[str], n_columns: int, first: int, last: int, name: str) -> None:
    """Refuse a row spanning lines ``first..last`` when a line inside one of its fields looks like a row."""
    for value in row:
        lines = value.split("\n")
        for line in lines[:-1]:  # the last piece is joined to the fields after the closing quote
            fields = next(csv.reader([line]), [])
            if len(fields) == n_columns and all(f.strip() for f in fields):
                raise DataError(
                    f"{name}, line {first}: a quoted field runs over lines {first}-{last} and swallows what "
                    f"looks like a row of its own ({line.strip()[:60]!r}); check the quotes on line {first} "
                    '(a field holding a " must be quoted, with the quote doubled: ""). If the line breaks are '
                    "meant, write the file as JSONL"
                )


def load_prompts(source: Any, column: str = "prompt") -> PromptData:
    """Load prompts from a list (of strings or of conversations), a ``datasets.Dataset``, or a file path.

    Every row's ``column`` must be of one kind: a non-empty string, or a conversation (a non-empty list of
    dicts with string ``role`` and ``content``). Conversations land in ``messages``, see :class:`PromptData`.
    """
    rows, name = _read_source(source, column)
    if not rows:
        raise DataError(f"{name} holds no prompts")
    keys = list(rows[0].keys())
    if column not in rows[0]:
        raise DataError(f"{name} has no {column!r} column; its columns are {', '.join(keys) or '(none)'}")
    values = [row.get(column) for row in rows]
    messages: list[list[Message]] | None = None
    if isinstance(values[0], list):
        messages = [_check_conversation(v, f"{name}, row {i}", column) for i, v in enumerate(values)]
        prompts = [_stand_in(m, f"{name}, row {i}") for i, m in enumerate(messages)]
    else:
        prompts = [_check_text(v, f"{name}, row {i}", column) for i, v in enumerate(values)]
    columns = {k: [row.get(k) for row in rows] for k in keys if k != column}
    return PromptData(prompts, columns, name, messages=messages)


def _read_source(source: Any, column: str) -> tuple[list[dict[str, Any]], str]:
    """(rows, a name for error messages) of a prompt source."""
    if isinstance(source, str | Path) and not (isinstance(source, str) and "\n" in source):
        path = Path(source)
        if not path.exists():
            raise DataError(f"prompt file {path} does not exist")
        return read_rows_file(path), str(path)
    if (
        isinstance(source, Sequence)
        and not isinstance(source, str)
        and all(isinstance(p, str | list) for p in source)
    ):
        return [{column: p} for p in source], "the prompt list"
    if isinstance(source, Sequence) and source and all(isinstance(r, Mapping) for r in source):
        return [dict(r) for r in source], "the prompt rows"  # rows as dicts: {"prompt": ..., "answer": ...}
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):
        if column not in source.column_names:
            raise DataError(
                f"dataset has no {column!r} column; its columns are {', '.join(source.column_names)}"
            )
        return [dict(r) for r in source], "the dataset"
    raise DataError(
        "prompts must be a list of strings, of chat-message lists or of row dicts, a datasets.Dataset or a file "
        "path, "
        f"got {type(source)}"
    )


def _check_text(value: Any, where: str, column: str) -> str:
    """A plain-text prompt, or the error for a row that is not one (``where`` is "source, row i")."""
    if isinstance(value, list):
        raise DataError(f"{where}: the {column!r} field is a list of chat messages, but row 0 is a string")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: the {column!r} field is empty or not a string ({value!r})")
    return value


def _check_conversation(value: Any, where: str, column: str) -> list[Message]:
    """A validated copy of one conversation (``where`` is "source, row i").

    Keys whose value is None are dropped: Arrow fills a struct field missing from one message with None.
    """
    if isinstance(value, str):
        raise DataError(f"{where}: the {column!r} field is a string, but row 0 is a list of chat messages")
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: the {column!r} field must be a non-empty list of chat messages, got {_short(value)}"
        )
    out = []
    for j, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DataError(
                f"{where}, message {j}: expected a dict with 'role' and 'content', got {_short(message)}"
            )
        for key in ("role", "content"):
            if message.get(key) is None:
                raise DataError(
                    f"{where}, message {j}: no {key!r} (it has: {', '.join(message) or 'nothing'})"
                )
            if not isinstance(message[key], str):
                raise DataError(f"{where}, message {j}: {key!r} must be a string, got {_short(message[key])}")
        if not message["role"].strip():
            raise DataError(f"{where}, message {j}: 'role' is empty")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _stand_in(conversation: list[Message], where: str) -> str:
    """The readable stand-in for an unrendered conversation: its last user message (else its last message)."""
    user = [m["content"] for m in conversation if m["role"] == "user"]
    text = user[-1] if user else conversation[-1]["content"]
    if not text.strip():
        raise DataError(f"{where}: the last {'user ' if user else ''}message is empty")
    return text


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, with its type, for error messages."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= limit else text[: limit - 3] + '...'}"


def render_prompts(data: PromptData, tokenizer: Any) -> PromptData:
    """Render conversational prompts into text with the tokenizer's chat template; plain data is returned as is.

    Each conversation becomes ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)`` in ``prompts``; the conversations are kept in the column
    ``prompt_messages`` (reward functions read them by name) and ``chat`` is set. The rendered text already
    holds the template's special tokens: tokenise it with ``add_special_tokens=False``, or a BOS appears
    twice. Rendering rendered data again renders from ``messages`` with the new tokenizer.
    """
    if data.messages is None:
        return data
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"{data.source} holds chat messages, but the tokenizer {name!r} has no chat template; "
            "use a chat model's tokenizer, set tokenizer.chat_template, or give plain-string prompts"
        )
    columns = {k: v for k, v in data.columns.items() if not (data.chat and k == MESSAGES_COLUMN)}
    if MESSAGES_COLUMN in columns:
        raise DataError(
            f"{data.source} already has a {MESSAGES_COLUMN!r} column, where render_prompts keeps the "
            "conversations; rename it"
        )
    prompts = [_render(tokenizer, m, f"{data.source}, row {i}") for i, m in enumerate(data.messages)]
    columns[MESSAGES_COLUMN] = list(data.messages)
    return dataclasses.replace(data, prompts=prompts, columns=columns, chat=True)


def _render(tokenizer: Any, conversation: list[Message], where: str) -> str:
    """One conversation through the chat template, with the row named when the template fails."""
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - e.g. a template that requires alternating roles
        raise DataError(f"{where}: the chat template failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: the chat template rendered {_short(text)}, not text")
    return text


def check_prompt_lengths(
    data: PromptData,
    tokenizer: Any,
    max_prompt_length: int,
    context: int | None = None,
    max_new_tokens: int = 0,
) -> None:
    """Refuse prompts longer than ``max_prompt_length`` tokens, naming the first offending row; with the
    model's ``context`` (its position count, see :func:`tether.models.context_length`), also a prompt that
    leaves no room for ``max_new_tokens`` response tokens - it would train until the row is drawn, then fail
    inside the model's position embedding.

    Conversational data must have gone through :func:`render_prompts`: its ``prompts`` are only stand-ins
    until then, and generating from them would silently drop the chat template.
    """
    if data.messages is not None and not data.chat:
        raise DataError(
            f"{data.source} holds chat messages that are not rendered yet: "
            "call tether.data.render_prompts(data, tokenizer) before checking lengths or generating"
        )
    if context is not None and max_new_tokens >= context:
        raise DataError(
            f"sampling.max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{context} positions; lower sampling.max_new_tokens"
        )
    lengths = [len(ids) for ids in tokenizer(data.prompts, add_special_tokens=False)["input_ids"]]
    for i, n in enumerate(lengths):
        if n > max_prompt_length:
            raise DataError(
                f"{data.source}, row {i}: prompt is {n} tokens long, more than max_prompt_length={max_prompt_length}"
            )
        if n == 0:
            raise DataError(f"{data.source}, row {i}: prompt encodes to zero tokens")
        if context is not None and n + max_new_tokens > context:
            raise DataError(_context_message(f"{data.source}, row {i}", n, context, max_new_tokens))


def _context_message(where: str, n: int, context: int, max_new_tokens: int) -> str:
    """Why a prompt of ``n`` tokens does not fit the model's ``context`` with its response, and what to do."""
    if n >= context:
        return (
            f"{where}: prompt is {n} tokens long, but the model's context is {context} positions; shorten or "
            f"drop the row (with sampling.max_new_tokens={max_new_tokens}, a prompt may have at most "
            f"{context - max_new_tokens} tokens)"
        )
    return (
        f"{where}: prompt of {n} tokens + sampling.max_new_tokens={max_new_tokens} = {n + max_new_tokens} "
        f"tokens, more than the model's context of {context} positions; shorten or drop the row, or lower "
        f"sampling.max_new_tokens to {context - n} or less"
    )


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
