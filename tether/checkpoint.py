"""Atomic, verified checkpoints and exact resume.

A checkpoint is a directory ``run_dir/checkpoints/step-NNNNNN`` holding the policy (and tokenizer) as
``save_pretrained`` writes them, so any checkpoint loads with ``from_pretrained``, plus ``trainer_state.pt``
with everything else needed to continue bit-for-bit on CPU: value model, optimiser, scheduler, KL
controller, prompt sampler and every RNG state.

How a checkpoint is written, so that no crash, kill, power loss or full disk leaves one that resume would load:

1. everything goes into a temporary sibling directory (``.tmp-step-N-PID``; ``.tmp-final-PID`` for ``final/``);
2. every file is fsynced, then ``manifest.json`` (each file's size and sha256) is written last and fsynced,
   then every directory of the temporary tree;
3. the directory is renamed into place and its parent fsynced;
4. only then are older checkpoints rotated out (``save_total_limit``), so the last good one is never deleted
   before the new one is complete.

A checkpoint is complete only when its manifest reads and every file it lists has the recorded size and
checksum. :func:`latest_checkpoint` checks the newest first and falls back to older ones with a warning naming
what was wrong. Weights holding NaN or inf are refused (:class:`NonFiniteWeightsError`), and a failed write
(a full disk above all) removes the temporary directory and raises :class:`CheckpointWriteError` naming the last
good checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
#: Written last into every checkpoint (and ``final/``): each file's size and sha256.
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
#: Name prefixes of the temporary directories a save leaves behind when its process is killed.
TEMP_PREFIXES = (".tmp-", ".old-")
#: Test hook: seconds to sleep after each file of a save is synced (lets a test kill a process mid-save).
SAVE_SLEEP_ENV = "TETHER_TEST_SAVE_SLEEP"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the path and what to do."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (a full disk, a read-only or vanished directory): nothing was replaced."""


class NonFiniteWeightsError(CheckpointError):
    """Weights or optimiser state holding NaN or inf, which a checkpoint must never contain."""


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-save/per-load progress bars, which would break tether's own progress bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- finiteness


def _float_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every floating-point tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _float_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _float_tensors(value, f"{prefix}[{i}]")


def check_finite(tensors: Any, what: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first tensor in ``tensors`` that holds NaN or inf.

    ``tensors``: a state dict, or any nesting of dicts / lists of tensors (an optimiser state); ``what`` says
    what is being saved, for the message.
    """
    for name, tensor in _float_tensors(tensors, ""):
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor shard
        if not bool(torch.isfinite(local.detach()).all()):
            kind = "NaN" if bool(torch.isnan(local.detach()).any()) else "inf"
            raise NonFiniteWeightsError(
                f"refusing to save {what}: {name} holds {kind} values; a checkpoint with non-finite weights "
                "would poison every resume (lower the learning rate, check the reward and kl.coef)"
            )


# ---------------------------------------------------------------------------------------------- durability


def _test_pause() -> None:
    """Sleep ``$TETHER_TEST_SAVE_SLEEP`` seconds (unset: not at all), so a test can kill a process mid-save."""
    delay = os.environ.get(SAVE_SLEEP_ENV)
    if delay:
        time.sleep(float(delay))


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents (its entries, for a directory) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(root: Path, **info: Any) -> None:
    """Fsync every file under ``root``, record its size and sha256 in ``root/manifest.json`` (written last,
    fsynced), then fsync every directory of the tree, deepest first."""
    files: dict[str, dict[str, Any]] = {}
    for path in _files_under(root):
        fsync_path(path)
        files[path.relative_to(root).as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        _test_pause()
    manifest = {"format": MANIFEST_FORMAT, **info, "files": files}
    _write_bytes(root / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    for directory in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_path(directory)
    fsync_path(root)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (an ``OSError`` such as ENOSPC surfaces here, not later)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def verify_checkpoint(path: Path) -> str | None:
    """None when ``path`` is complete (its manifest reads and every file matches it), else what is wrong."""
    manifest_path = Path(path) / MANIFEST_FILE
    if not manifest_path.is_file():
        return f"no {MANIFEST_FILE} (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST_FILE} is unreadable ({err})"
    for name, expected in files.items():
        file = Path(path) / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} is {size} bytes, the manifest says {expected['size']}"
        if file_sha256(file) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


# ---------------------------------------------------------------------------------------------- writing


def _is_disk_full(err: BaseException, where: Path) -> bool:
    """Whether ``err`` is (or looks like: torch's and safetensors' own wrappers) a full disk."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if "No space left" in text or "unexpected pos" in text or "os error 28" in text:
        return True
    with contextlib.suppress(OSError):
        return shutil.disk_usage(where).free < (1 << 20)
    return False


def _is_write_error(err: BaseException) -> bool:
    """An I/O failure while writing (as opposed to a bug): an OSError, or torch's / safetensors' wrapping."""
    if isinstance(err, OSError):
        return True
    text = str(err)
    return any(
        s in text for s in ("No space left", "unexpected pos", "os error", "PytorchStreamWriter", "write")
    )


def _last_good(run_dir: Path, before: int | None) -> str:
    older = [p for p in list_checkpoints(run_dir) if before is None or _step_of(p) < before]
    return f"the last good checkpoint is {older[-1]}" if older else "there is no earlier checkpoint"


def _write_atomically(
    final: Path,
    tmp: Path,
    write: Callable[[Path], None],
    what: str,
    last_good: Callable[[], str],
    **info: Any,
) -> None:
    """``write(tmp)``, a manifest, then ``tmp`` renamed to ``final``; on failure ``tmp`` is removed and a
    :class:`CheckpointWriteError` names ``what`` and the last good checkpoint."""
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        write_manifest(tmp, **info)
        _test_pause()
        _replace_dir(tmp, final)
        fsync_path(final.parent)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_write_error(err):
            raise
        cause = "disk full" if _is_disk_full(err, final.parent) else f"error ({err})"
        raise CheckpointWriteError(
            f"{cause} while writing {what}; {last_good()}; free some space (or fix the directory) and rerun with "
            "--resume auto to continue from it"
        ) from err


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed after."""
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through memory, so that a full disk raises a plain OSError from the write."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_bytes(path, buffer.getbuffer().tobytes())


def save_pretrained_atomic(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: Path,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """``save_pretrained`` into ``out_dir`` via a temporary directory, a manifest, fsync and a rename.

    ``weights``: the model's whole state dict when its parameters are sharded (see :mod:`tether.sharding`).
    Refuses weights holding NaN or inf.
    """
    out_dir = Path(out_dir)
    check_finite(weights if weights is not None else model.state_dict(), f"{out_dir}")

    def write(tmp: Path) -> None:
        with quiet_transformers():
            model.save_pretrained(tmp, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    run_dir = out_dir.parent
    _write_atomically(out_dir, tmp, write, f"{out_dir}", lambda: _last_good(run_dir, None))


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives: ``run_dir/checkpoints/step-NNNNNN``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:06d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    state: dict[str, Any],
    keep: int,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoints/step-{step}`` atomically, then keep only the newest ``keep`` checkpoints.

    ``weights``: the policy's whole state dict when its parameters are sharded. Weights or optimiser state
    holding NaN or inf are refused before anything is written. Checkpoints of later steps (left by a run that
    was resumed from an earlier one) belong to an abandoned history and are removed once this one is complete.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    what = f"checkpoint step {step} to {root}"
    check_finite(weights if weights is not None else policy.state_dict(), f"{what}: the policy")
    check_finite(state, f"{what}: the trainer state")
    payload = {**state, "step": step, "rng": rng_state()}

    def write(tmp: Path) -> None:
        with quiet_transformers():
            policy.save_pretrained(tmp / "policy", state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "policy")
        _test_pause()
        _save_torch(payload, tmp / STATE_FILE)

    final = checkpoint_path(run_dir, step)
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    _write_atomically(final, tmp, write, what, lambda: _last_good(run_dir, step), step=step)
    _rotate(run_dir, step, keep)
    return final


def _rotate(run_dir: Path, step: int, keep: int) -> None:
    """Remove checkpoints after ``step`` and all but the newest ``keep`` up to it (the new one is complete)."""
    found = _step_dirs(run_dir)
    stale = [p for p in found if _step_of(p) > step]
    kept = [p for p in found if _step_of(p) <= step]
    for old in stale + (kept[:-keep] if keep > 0 else []):
        shutil.rmtree(old, ignore_errors=True)


def remove_temp_dirs(run_dir: Path) -> list[Path]:
    """Remove what killed saves left (``.tmp-*`` / ``.old-*`` in the run directory and ``checkpoints/``).

    Call it only while holding the run directory's lock: a live save's temporary directory looks the same.
    """
    removed = []
    for parent in (Path(run_dir), Path(run_dir) / CHECKPOINT_DIR):
        if not parent.is_dir():
            continue
        for path in parent.iterdir():
            if path.name.startswith(TEMP_PREFIXES) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------- reading


def _step_of(path: Path) -> int:
    match = _STEP_RE.match(path.name)
    return int(match.group(1)) if match else -1


def _step_dirs(run_dir: Path) -> list[Path]:
    """Every ``checkpoints/step-N`` directory, complete or not, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_RE.match(p.name) and p.is_dir()), key=_step_of)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run that hold a manifest (finished saves), oldest first; not checksum-verified."""
    return [p for p in _step_dirs(run_dir) if (p / MANIFEST_FILE).is_file()]


def _warn(message: str) -> None:
    """Print a warning on the main process only (every process of a job reads the same checkpoints)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def find_complete_checkpoint(run_dir: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies against its manifest, or None.

    Each newer one that does not verify is skipped with a warning naming what is wrong with it.
    """
    found = _step_dirs(run_dir)
    for i in range(len(found) - 1, -1, -1):
        key = _cache_key(found[i])
        problem = None if key in _verified else verify_checkpoint(found[i])
        if problem is None:
            _verified.add(key)
            return found[i]
        if warn:
            fallback = f"trying {found[i - 1].name}" if i > 0 else "no older checkpoint to fall back to"
            _warn(f"checkpoint {found[i]} is incomplete or corrupt: {problem}; {fallback}")
    return None


#: Checkpoints already verified in this process, keyed by path and manifest mtime (resume verifies them twice:
#: once to decide, with --resume auto, whether there is anything to resume, once to load).
_verified: set[tuple[str, int]] = set()


def _cache_key(path: Path) -> tuple[str, int]:
    try:
        return str(path.resolve()), (path / MANIFEST_FILE).stat().st_mtime_ns
    except OSError:
        return str(path), -1


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete (verified) checkpoint of ``run_dir``; a clear error when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"cannot resume: run directory {run_dir} does not exist")
    ckpt = find_complete_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(
            f"cannot resume: {run_dir} has no complete checkpoint under {CHECKPOINT_DIR}/"
        )
    return ckpt


def load_state(ckpt: Path) -> dict[str, Any]:
    # weights_only=False: the state holds RNG tuples and plain Python containers written by tether itself.
    return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)


def load_policy_weights(policy: PreTrainedModel, ckpt: Path) -> None:
    """Load the checkpointed policy weights into ``policy`` in place (tied weights, or LoRA adapters)."""
    from tether.models import is_peft_model
    from tether.sharding import is_sharded, load_full_state_dict, model_class

    path = Path(ckpt) / "policy"
    if is_peft_model(policy):
        from peft import load_peft_weights, set_peft_model_state_dict

        set_peft_model_state_dict(policy, load_peft_weights(str(path)))
        return
    with quiet_transformers():
        saved = model_class(policy).from_pretrained(path)
    if is_sharded(policy):
        load_full_state_dict(policy, saved.state_dict())
    else:
        policy.load_state_dict(saved.state_dict())
