"""Prompt loading from lists, datasets and local files; length checks; the checkpointable sampler."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tether.data import (
    MESSAGES_COLUMN,
    DataError,
    PromptSampler,
    check_prompt_lengths,
    load_prompts,
    render_prompts,
)
from tether.toy import make_toy_tokenizer

ROWS = [
    {"prompt": "write a poem", "answer": "roses", "level": 1},
    {"prompt": "add 2 and 3", "answer": "5", "level": 2},
    {"prompt": "name a colour", "answer": "blue", "level": 3},
]


def _check_rows(data, source_contains: str | None = None) -> None:
    assert data.prompts == [r["prompt"] for r in ROWS]
    assert len(data) == 3
    assert data.columns["answer"] == ["roses", "5", "blue"]
    assert data.columns["level"] == [1, 2, 3]
    assert "prompt" not in data.columns
    if source_contains is not None:
        assert source_contains in data.source


def test_load_from_a_list() -> None:
    data = load_prompts(["a", "b c"])
    assert data.prompts == ["a", "b c"] and data.columns == {}
    prompts, cols = data.select([1, 0, 1])
    assert prompts == ["b c", "a", "b c"] and cols == {}


def test_load_from_a_dataset() -> None:
    data = load_prompts(datasets.Dataset.from_list(ROWS))
    _check_rows(data)
    prompts, cols = data.select([2, 0])
    assert prompts == ["name a colour", "write a poem"]
    assert cols == {"answer": ["blue", "roses"], "level": [3, 1]}


def test_load_from_a_dataset_with_another_column_name() -> None:
    ds = datasets.Dataset.from_list([{"question": "q1", "id": 7}, {"question": "q2", "id": 8}])
    data = load_prompts(ds, column="question")
    assert data.prompts == ["q1", "q2"] and data.columns == {"id": [7, 8]}
    with pytest.raises(DataError) as info:
        load_prompts(ds)
    assert "'prompt'" in str(info.value) and "question" in str(info.value) and "id" in str(info.value)


def test_load_from_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    # a blank line is allowed
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + json.dumps(ROWS[2]) + "\n")
    _check_rows(load_prompts(path), str(path))
    _check_rows(load_prompts(str(path)), str(path))


def test_load_from_csv(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text(
        "prompt,answer,level\n" + "".join(f"{r['prompt']},{r['answer']},{r['level']}\n" for r in ROWS)
    )
    data = load_prompts(path)
    assert data.prompts == [r["prompt"] for r in ROWS]
    # CSV readers infer types: "5" becomes a number
    assert [str(a) for a in data.columns["answer"]] == ["roses", "5", "blue"]
    assert data.columns["level"] == [1, 2, 3]


def test_load_from_parquet(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    _check_rows(load_prompts(path), str(path))


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(empty)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(blank)
    with pytest.raises(DataError, match="no prompts"):
        load_prompts([])
    for name, text in (("empty.csv", ""), ("header_only.csv", "prompt,answer\n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            load_prompts(path)
    other = tmp_path / "p.txt"
    other.write_text("hello\n")
    with pytest.raises(DataError, match="unsupported"):
        load_prompts(other)


def test_missing_prompt_column_lists_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError) as info:
        load_prompts(path)
    message = str(info.value)
    assert "'prompt'" in message and "question" in message and "answer" in message and str(path) in message


@pytest.mark.parametrize("bad", ['""', '"   "', "null", "3"])
def test_empty_or_non_string_prompt_names_the_row(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "also fine"}\n' + f'{{"prompt": {bad}}}\n')
    with pytest.raises(DataError, match=r"row 2"):
        load_prompts(path)


def test_empty_prompt_in_a_list_names_the_row() -> None:
    with pytest.raises(DataError, match=r"the prompt list, row 1"):
        load_prompts(["ok", " "])


def test_empty_csv_cell_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt,answer\nhi,1\n,2\n")
    with pytest.raises(DataError, match=r"row 1: the 'prompt' field is empty"):
        load_prompts(path)


def test_bad_json_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",\n')
    with pytest.raises(DataError, match=r"line 3: not valid JSON"):
        load_prompts(path)
    path.write_text('{"prompt": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object"):
        load_prompts(path)


def test_check_prompt_lengths_names_the_row() -> None:
    tokenizer = make_toy_tokenizer()  # one token per character
    data = load_prompts(["abc", "abcde", "abcdefg", "ab"])
    check_prompt_lengths(data, tokenizer, max_prompt_length=7)
    with pytest.raises(DataError, match=r"row 1: prompt is 5 tokens long, more than max_prompt_length=4"):
        check_prompt_lengths(data, tokenizer, max_prompt_length=4)
    with pytest.raises(DataError, match=r"row 2: prompt is 7 tokens long"):
        check_prompt_lengths(data, tokenizer, max_prompt_length=6)


def test_prompt_sampler_covers_every_prompt_once_per_pass() -> None:
    sampler = PromptSampler(10, seed=0)
    first_pass = sampler.next_indices(10)
    assert sorted(first_pass) == list(range(10))
    second_pass = sampler.next_indices(10)
    assert sorted(second_pass) == list(range(10)) and second_pass != first_pass
    assert PromptSampler(10, seed=0).next_indices(10) == first_pass  # same seed, same order


def test_prompt_sampler_state_round_trip(tmp_path: Path) -> None:
    sampler = PromptSampler(10, seed=3)
    for _ in range(7):  # 21 draws: crosses two pass boundaries, stops mid-pass
        sampler.next_indices(3)
    path = tmp_path / "sampler.pt"
    torch.save(sampler.state_dict(), path)
    expected = [sampler.next_indices(3) for _ in range(8)]  # crosses further boundaries

    resumed = PromptSampler(10, seed=999)
    resumed.next_indices(4)  # some unrelated history that the state must overwrite
    resumed.load_state_dict(torch.load(path, weights_only=False))
    assert [resumed.next_indices(3) for _ in range(8)] == expected


# --- conversational prompts ---------------------------------------------------------------------------------

# Every character the template writes is in the toy alphabet (lowercase, space, ".,!"): one token each.
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}.{% endif %}"
CHATS = [
    {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}],
        "answer": "a",
    },
    {
        "prompt": [
            {"role": "user", "content": "add two"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "and three"},
        ],
        "answer": "b",
    },
]


def chat_tokenizer(template: str = TEMPLATE) -> PreTrainedTokenizerFast:
    tokenizer = make_toy_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_jsonl_loads_and_renders_exactly(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", CHATS)
    data = load_prompts(path)
    # as loaded: the conversations, and the last user message of each as a readable stand-in
    assert data.messages == [r["prompt"] for r in CHATS]
    assert data.prompts == ["hi there", "and three"] and len(data) == 2
    assert not data.chat and data.columns == {"answer": ["a", "b"]}

    rendered = render_prompts(data, chat_tokenizer())
    # contents joined by the template, each followed by a space, then the generation prompt "."
    assert rendered.prompts == ["be brief hi there .", "add two ok and three ."]
    assert rendered.chat and rendered.messages == data.messages and rendered.source == str(path)
    assert rendered.columns == {"answer": ["a", "b"], MESSAGES_COLUMN: [r["prompt"] for r in CHATS]}
    prompts, columns = rendered.select([1, 1, 0])
    assert prompts == ["add two ok and three ."] * 2 + ["be brief hi there ."]
    assert columns[MESSAGES_COLUMN][2] == CHATS[0]["prompt"] and columns["answer"] == ["b", "b", "a"]
    # one token per character: 22 tokens for row 1
    check_prompt_lengths(rendered, chat_tokenizer(), max_prompt_length=22)
    with pytest.raises(DataError, match=r"row 1: prompt is 22 tokens long"):
        check_prompt_lengths(rendered, chat_tokenizer(), max_prompt_length=21)
    # rendering again renders from the conversations, not from the rendered text
    assert render_prompts(rendered, chat_tokenizer()) == rendered


def test_chat_from_a_list_and_a_dataset() -> None:
    conversations = [r["prompt"] for r in CHATS]
    from_list = render_prompts(load_prompts(conversations), chat_tokenizer())
    assert from_list.prompts == ["be brief hi there .", "add two ok and three ."]
    # Arrow gives every message of a column the union of the keys, filling the missing ones with None;
    # those are dropped so that a template sees the message as written.
    rows = [
        {"prompt": [{"role": "user", "content": "yo", "name": "ann"}]},
        {"prompt": [{"role": "user", "content": "x"}]},
    ]
    data = load_prompts(datasets.Dataset.from_list(rows))
    assert data.messages == [
        [{"role": "user", "content": "yo", "name": "ann"}],
        [{"role": "user", "content": "x"}],
    ]
    assert render_prompts(data, chat_tokenizer()).prompts == ["yo .", "x ."]


def test_plain_strings_are_returned_unchanged() -> None:
    data = load_prompts(["abc", "de"])
    assert data.messages is None and not data.chat
    assert render_prompts(data, chat_tokenizer()) is data
    assert render_prompts(data, make_toy_tokenizer()) is data  # no template needed for plain text


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ([], r"row 1: the 'prompt' field must be a non-empty list of chat messages, got list \[\]"),
        (["hello"], r"row 1, message 0: expected a dict with 'role' and 'content', got str 'hello'"),
        ([{"role": "user"}], r"row 1, message 0: no 'content' \(it has: role\)"),
        ([{"content": "hi"}], r"row 1, message 0: no 'role' \(it has: content\)"),
        (
            [{"role": "user", "content": "a"}, {"role": 1, "content": "b"}],
            r"row 1, message 1: 'role' must be a string, got int 1",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            r"row 1, message 0: 'content' must be a string, got list",
        ),
        ([{"role": " ", "content": "hi"}], r"row 1, message 0: 'role' is empty"),
        ([{"role": "user", "content": "  "}], r"row 1: the last user message is empty"),
        ([{"role": "system", "content": ""}], r"row 1: the last message is empty"),
        (None, r"row 1: the 'prompt' field must be a non-empty list of chat messages, got NoneType None"),
    ],
)
def test_bad_message_rows_are_named(tmp_path: Path, row: object, pattern: str) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", [CHATS[0], {"prompt": row}])
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + ", " + pattern):
        load_prompts(path)


def test_mixed_rows_name_the_first_row_of_the_other_kind(tmp_path: Path) -> None:
    chat = CHATS[0]["prompt"]
    with pytest.raises(
        DataError, match=r"the prompt list, row 2: .* is a list of chat messages, but row 0 is a string"
    ):
        load_prompts(["a", "b", chat, "c", chat])
    path = _write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": chat}, {"prompt": chat}, {"prompt": "plain"}])
    with pytest.raises(
        DataError, match=r"mixed\.jsonl, row 2: .* is a string, but row 0 is a list of chat messages"
    ):
        load_prompts(path)


def test_missing_chat_template_is_a_clear_error() -> None:
    data = load_prompts([CHATS[0]["prompt"]])
    with pytest.raises(
        DataError, match=r"the prompt list holds chat messages, but the tokenizer .* has no chat template"
    ):
        render_prompts(data, make_toy_tokenizer())


def test_template_failure_names_the_row() -> None:
    strict = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with the user') }}{% endif %}"
        + TEMPLATE
    )
    data = load_prompts([[{"role": "user", "content": "a"}], CHATS[0]["prompt"]])
    with pytest.raises(
        DataError, match=r"the prompt list, row 1: the chat template failed: .*start with the user"
    ):
        render_prompts(data, chat_tokenizer(strict))
    with pytest.raises(
        DataError, match=r"the prompt list, row 0: the chat template rendered str '  ', not text"
    ):
        render_prompts(data, chat_tokenizer("  "))


def test_unrendered_conversations_are_refused_before_generation() -> None:
    data = load_prompts([CHATS[0]["prompt"]])
    with pytest.raises(DataError, match=r"not rendered yet: call tether\.data\.render_prompts"):
        check_prompt_lengths(data, chat_tokenizer(), max_prompt_length=100)


def test_a_prompt_messages_column_is_not_overwritten() -> None:
    data = load_prompts(datasets.Dataset.from_list([{"prompt": CHATS[0]["prompt"], MESSAGES_COLUMN: "mine"}]))
    with pytest.raises(DataError, match=r"already has a 'prompt_messages' column"):
        render_prompts(data, chat_tokenizer())
