"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``run_dir/checkpoints/step-NNNNNN`` holding the policy (and tokenizer) as
``save_pretrained`` writes them, so any checkpoint loads with ``from_pretrained``, plus ``trainer_state.pt``
with everything else needed to continue bit-for-bit on CPU: value model, optimiser, scheduler, KL
controller, prompt sampler and every RNG state. It is written to a temporary sibling directory and
renamed into place, so a crash mid-save never leaves a half checkpoint where resume would find it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")


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


def save_pretrained_atomic(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: Path,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """``save_pretrained`` into ``out_dir`` via a temporary directory and a rename.

    ``weights``: the model's whole state dict when its parameters are sharded (see :mod:`tether.sharding`).
    """
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with quiet_transformers():
        model.save_pretrained(tmp, state_dict=weights)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, out_dir)


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_checkpoint(
    run_dir: Path,
    step: int,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    state: dict[str, Any],
    keep: int,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoints/step-{step}`` atomically and keep only the newest ``keep`` checkpoints.

    ``weights``: the policy's whole state dict when its parameters are sharded.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with quiet_transformers():
        policy.save_pretrained(tmp / "policy", state_dict=weights)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "policy")
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    _replace_dir(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of ``run_dir``; a clear error when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"cannot resume: run directory {run_dir} does not exist")
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"cannot resume: {run_dir} has no complete checkpoint under {CHECKPOINT_DIR}/")
    return ckpts[-1]


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
