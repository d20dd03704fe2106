"""Atomic, verified checkpoints: manifest, fallback past a corrupt newest one, rotation, full disk, NaN refusal."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest
import torch

import tether.checkpoint as ckpt_mod
from tether.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointWriteError,
    NonFiniteWeightsError,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
    save_pretrained_atomic,
    verify_checkpoint,
)
from tether.toy import make_toy_model, make_toy_tokenizer


@pytest.fixture
def tiny():
    tok = make_toy_tokenizer()
    return make_toy_model(tok, seed=0), tok


def save(run: Path, step: int, tiny, keep: int = 5) -> Path:
    model, tok = tiny
    return save_checkpoint(run, step, model, tok, {"optimizer": {"m": torch.ones(3)}}, keep)


def temp_dirs(run: Path) -> list[Path]:
    return [
        p for d in (run, run / "checkpoints") if d.is_dir() for p in d.iterdir() if p.name.startswith(".")
    ]


def test_a_checkpoint_holds_a_manifest_of_every_file_and_verifies(tmp_path, tiny):
    path = save(tmp_path, 1, tiny)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["step"] == 1
    assert {STATE_FILE, "policy/model.safetensors", "policy/config.json"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size and len(entry["sha256"]) == 64
    assert verify_checkpoint(path) is None
    assert temp_dirs(tmp_path) == []  # the temporary directory was renamed into place


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (
            lambda p: (p / STATE_FILE).write_bytes((p / STATE_FILE).read_bytes()[:100]),
            "trainer_state.pt is 100 bytes",
        ),
        (lambda p: (p / MANIFEST_FILE).unlink(), "no manifest.json"),
        (lambda p: (p / "policy" / "model.safetensors").unlink(), "policy/model.safetensors is missing"),
        (lambda p: (p / MANIFEST_FILE).write_text("{not json"), "manifest.json is unreadable"),
    ],
)
def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning_naming_the_problem(
    tmp_path, tiny, capsys, damage, problem
):
    save(tmp_path, 1, tiny)
    newest = save(tmp_path, 2, tiny)
    damage(newest)
    assert latest_checkpoint(tmp_path).name == "step-000001"
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is incomplete or corrupt: {problem}" in err and "trying step-000001" in err


def test_a_flipped_byte_of_the_same_size_is_caught_by_the_checksum(tmp_path, tiny, capsys):
    save(tmp_path, 1, tiny)
    newest = save(tmp_path, 2, tiny)
    weights = newest / "policy" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert "model.safetensors does not match its sha256" in capsys.readouterr().err


def test_no_complete_checkpoint_is_a_clear_error(tmp_path, tiny):
    newest = save(tmp_path, 1, tiny)
    (newest / STATE_FILE).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no complete checkpoint"):
        latest_checkpoint(tmp_path)


def full_disk_on(name: str, monkeypatch):
    """Make the write of the file called ``name`` fail as a full disk does, after writing part of it."""
    real = ckpt_mod._write_bytes

    def write(path: Path, data: bytes) -> None:
        if path.name == name:
            path.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_bytes", write)


def test_a_full_disk_mid_save_removes_the_temp_dir_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny, monkeypatch
):
    good = save(tmp_path, 1, tiny, keep=1)
    full_disk_on(STATE_FILE, monkeypatch)
    with pytest.raises(CheckpointWriteError) as info:
        save(tmp_path, 2, tiny, keep=1)
    root = tmp_path / "checkpoints"
    assert str(info.value).startswith(
        f"disk full while writing checkpoint step 2 to {root}; the last good checkpoint is {good};"
    )
    assert "--resume auto" in str(info.value)
    assert temp_dirs(tmp_path) == []
    assert list_checkpoints(tmp_path) == [good] and verify_checkpoint(good) is None  # rotation did not run


def test_a_full_disk_with_no_earlier_checkpoint_says_so(tmp_path, tiny, monkeypatch):
    full_disk_on(MANIFEST_FILE, monkeypatch)  # the very last write of the save
    with pytest.raises(CheckpointWriteError, match="there is no earlier checkpoint"):
        save(tmp_path, 1, tiny)
    assert temp_dirs(tmp_path) == [] and list_checkpoints(tmp_path) == []


def test_rotation_removes_old_checkpoints_only_once_the_new_one_is_complete(tmp_path, tiny, monkeypatch):
    seen_during_save: list[list[str]] = []
    real = ckpt_mod.write_manifest

    def spy(root: Path, **info) -> None:
        seen_during_save.append([p.name for p in list_checkpoints(tmp_path)])
        real(root, **info)

    monkeypatch.setattr(ckpt_mod, "write_manifest", spy)
    for step in (1, 2, 3):
        save(tmp_path, step, tiny, keep=1)
    assert seen_during_save == [
        [],
        ["step-000001"],
        ["step-000002"],
    ]  # the previous one is there while writing
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003"]


def test_checkpoints_after_the_one_written_belong_to_an_abandoned_history_and_are_removed(tmp_path, tiny):
    for step in (1, 2, 3):
        save(tmp_path, step, tiny)
    save(tmp_path, 2, tiny)  # a run resumed from step 1 (step 3 lost) writes step 2 again
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]


def test_non_finite_weights_are_never_saved(tmp_path, tiny):
    model, tok = tiny
    with torch.no_grad():
        model.transformer.wte.weight[3, 1] = math.nan
    with pytest.raises(
        NonFiniteWeightsError, match=r"checkpoint step 1 .*transformer\.wte\.weight holds NaN"
    ):
        save_checkpoint(tmp_path, 1, model, tok, {}, keep=2)
    with pytest.raises(NonFiniteWeightsError, match="holds NaN"):
        save_pretrained_atomic(model, tok, tmp_path / "final")
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    assert not (tmp_path / "final").exists() and temp_dirs(tmp_path) == []


def test_non_finite_optimizer_state_is_never_saved(tmp_path, tiny):
    model, tok = tiny
    state = {"optimizer": {"state": {0: {"exp_avg": torch.tensor([1.0, math.inf])}}}}
    with pytest.raises(NonFiniteWeightsError, match=r"optimizer\.state\.0\.exp_avg holds inf"):
        save_checkpoint(tmp_path, 1, model, tok, state, keep=2)


def test_final_model_is_written_with_a_manifest(tmp_path, tiny):
    model, tok = tiny
    save_pretrained_atomic(model, tok, tmp_path / "final")
    save_pretrained_atomic(model, tok, tmp_path / "final")  # replacing an existing final/
    assert verify_checkpoint(tmp_path / "final") is None and temp_dirs(tmp_path) == []
