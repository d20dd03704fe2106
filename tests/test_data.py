"""Prompt loading from lists, datasets and local files; length checks; the checkpointable sampler."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from tether.data import DataError, PromptSampler, check_prompt_lengths, load_prompts
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
