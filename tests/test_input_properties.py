"""Property-based tests (hypothesis): malformed datasets and configs thrown at the loaders always end in a
DataError or ConfigError that names the file or the field — never another exception type (issue 13).

Kept small and fast: files of at most a few hundred bytes, at most 60 examples per property.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import typing
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.config import ConfigError, from_dict
from tether.data import DataError, load_prompts
from tether.rewards.data import load_preferences
from tether.sample import SampleConfig
from tether.trainers.grpo import GRPOConfig
from tether.trainers.ppo import PPOConfig
from tether.trainers.reward import RewardConfig

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
column_names = st.sampled_from(["prompt", "chosen", "rejected", "margin", "answer", "role", "content", ""])
rows = st.lists(st.dictionaries(column_names, json_values, max_size=4), max_size=4)
csv_text = st.text(alphabet=list('ab ,"\n\r\x00é;'), max_size=80)


def load_file(data: bytes, suffix: str, loader: Any) -> tuple[Path, BaseException | None]:
    """Write ``data`` to a fresh file with ``suffix`` and run ``loader`` on it: (path, the exception or None)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        try:
            loader(path)
        except Exception as exc:  # noqa: BLE001 - the property is about which exceptions come out
            return path, exc
    return path, None


def assert_names_the_file(path: Path, error: BaseException | None) -> None:
    if error is not None:
        assert isinstance(error, DataError), f"{type(error).__name__}: {error}"
        assert str(path) in str(error), str(error)


LOADERS = {
    "prompts": load_prompts,
    "preferences": load_preferences,
    "preferences+margin": lambda path: load_preferences(path, use_margin=True),
}


@FAST
@given(
    data=st.binary(max_size=300), suffix=st.sampled_from(SUFFIXES), loader=st.sampled_from(sorted(LOADERS))
)
def test_random_bytes(data: bytes, suffix: str, loader: str) -> None:
    assert_names_the_file(*load_file(data, suffix, LOADERS[loader]))


@FAST
@given(text=csv_text, loader=st.sampled_from(sorted(LOADERS)))
def test_broken_csv(text: str, loader: str) -> None:
    assert_names_the_file(*load_file(text.encode("utf-8"), ".csv", LOADERS[loader]))


@FAST
@given(rows=rows, junk=st.lists(st.text(max_size=10), max_size=2), loader=st.sampled_from(sorted(LOADERS)))
def test_jsonl_with_wrong_types_and_missing_columns(rows: list[dict], junk: list[str], loader: str) -> None:
    lines = [json.dumps(r) for r in rows] + junk  # junk: lines that may not be JSON objects
    assert_names_the_file(*load_file("\n".join(lines).encode("utf-8"), ".jsonl", LOADERS[loader]))


@FAST
@given(rows=rows, loader=st.sampled_from(sorted(LOADERS)))
def test_csv_written_from_rows(rows: list[dict], loader: str) -> None:
    keys = sorted({k for r in rows for k in r})
    text = ",".join(keys) + "\n" + "\n".join(",".join(str(r.get(k, "")) for k in keys) for r in rows)
    assert_names_the_file(*load_file(text.encode("utf-8"), ".csv", LOADERS[loader]))


def test_empty_files() -> None:
    for suffix in SUFFIXES:
        for loader in LOADERS.values():
            path, error = load_file(b"", suffix, loader)
            assert error is not None
            assert_names_the_file(path, error)


# ---------------------------------------------------------------------------------------------------
# configs

CONFIGS = (PPOConfig, GRPOConfig, RewardConfig, SampleConfig)


def field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every settable field of a config dataclass, nested ones by their dotted path."""
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += field_paths(hints[f.name], f"{prefix}{f.name}.")
        out.append(prefix + f.name)
    return out


config_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**6), max_value=10**6)
    | st.floats()
    | st.sampled_from(["nan", "inf", "-1", "0", "1e-3", "none", "true", "banana", "k3", "[1, 2]", ""])
    | st.text(max_size=6)
    | st.lists(st.floats() | st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
)


def nested(path: str, value: Any) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    return {head: nested(rest, value) if rest else value}


@FAST
@given(data=st.data(), cls=st.sampled_from(CONFIGS))
def test_random_values_for_random_fields(data: st.DataObject, cls: type) -> None:
    paths = data.draw(st.lists(st.sampled_from(field_paths(cls)), min_size=1, max_size=3, unique=True))
    mapping: dict[str, Any] = {}
    for path in paths:
        if any(path.startswith(other + ".") or other.startswith(path + ".") for other in mapping):
            continue  # a block and one of its fields: keep the first
        value = data.draw(config_values)
        head, _, rest = path.partition(".")
        mapping[head] = {**mapping.get(head, {}), **nested(rest, value)} if rest else value
    try:
        from_dict(cls, mapping)
    except ConfigError as exc:
        named = [p for p in paths if p in str(exc) or p.rsplit(".", 1)[-1] in str(exc)]
        assert named, f"{exc} (fields set: {mapping})"
