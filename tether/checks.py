"""Checks of what a user gives, run before anything heavy loads: config value ranges, output paths, model
directories and devices.

Each check raises one :class:`ConfigError` whose message names the field, file or value at fault, what is
allowed, and what to do — instead of a traceback from deep inside torch or transformers after the models
have loaded. The value ranges are tables (field name -> :class:`Range`) declared next to each config
dataclass and applied by :func:`check_ranges` from its ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file, override or argument that does not fit: the message names the field and the fix."""


# ---------------------------------------------------------------------------------------------------
# value ranges


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric field: ``low`` and ``high`` bounds (None: unbounded), each inclusive
    unless ``*_open``; ``hint`` is appended to the error (e.g. how to disable the feature instead); ``text``
    replaces the generated description."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""
    text: str = ""

    def allows(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        """``">= 0"``, ``"> 0"``, ``"in [0, 1]"``, ``"in (0, 1]"`` ..."""
        if self.text:
            return self.text
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "a finite number"


PROBABILITY = Range(0.0, 1.0)
NON_NEGATIVE = Range(0.0)
POSITIVE = Range(0.0, low_open=True)
AT_LEAST_ONE = Range(1.0, text="positive (>= 1)")  # counts


def _finite_error(path: str, value: Any, allowed: Range | None) -> ConfigError:
    rule = f"a finite number {allowed.describe()}" if allowed is not None else "a finite number"
    return ConfigError(f"{path} must be {rule}, got {value!r}")


def check_value(path: str, value: Any, allowed: Range | None) -> None:
    """Refuse a non-finite float anywhere, and a number outside ``allowed``; ``None`` (a disabled feature)
    and non-numbers pass (their types are checked when the config is parsed)."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_value(f"{path}[{i}]", item, allowed)
        return
    if not isinstance(value, int | float):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise _finite_error(path, value, allowed)
    if allowed is not None and not allowed.allows(value):
        raise ConfigError(f"{path} must be {allowed.describe()}, got {value!r}{allowed.hint}")


def check_ranges(config: Any, table: Mapping[str, Range], prefix: str = "") -> None:
    """Check every field of the dataclass ``config`` against ``table`` (field name -> Range); every float
    field must also be finite. Nested dataclasses are skipped: each checks its own fields, with its prefix.

    Errors name the field by its dotted path (``prefix.name``, e.g. ``kl.coef``), the value and the range.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            continue
        check_value(f"{prefix}.{f.name}" if prefix else f.name, value, table.get(f.name))


# ---------------------------------------------------------------------------------------------------
# paths


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(directory: Path) -> str | None:
    """None when a file can be created in ``directory``, else the reason (os.access is not enough: root
    passes it on a read-only file system)."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".tether-write-check-")
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(fd)
    os.unlink(name)
    return None


def check_output_dir(path: str | Path, option: str = "--output_dir") -> None:
    """Refuse an output directory that is a file, lies under a file, or cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file, not a directory; give a directory path")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ConfigError(f"{option} {path}: {base} is a file, so no directory can be created under it")
    reason = _probe_writable(base)
    if reason is not None:
        raise ConfigError(f"{option} {path}: cannot write in {base} ({reason}); give a writable directory")


def check_output_file(path: str | Path, option: str = "--output") -> None:
    """Refuse an output file path that is a directory, or whose directory cannot be created or written."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; give a file path, e.g. {path / 'samples.jsonl'}")
    check_output_dir(path.parent, f"{option} {path}: the directory")


#: Files one of which a tokenizer saved with ``save_pretrained`` leaves in its directory.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)
#: Weight files of a ``save_pretrained`` model directory (or the index of sharded ones).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_dir(path: Any, option: str = "--policy", tokenizer: bool = True) -> None:
    """Refuse a model path that is not a ``save_pretrained`` directory: missing, a file, no config.json,
    no weights, or (``tokenizer=True``: its tokenizer is loaded from it) no tokenizer files. A model
    instance passes. A PEFT adapter directory (adapter_config.json) is accepted as it is."""
    if not isinstance(path, str | Path):
        return
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"{option} {path} does not exist; tether loads models offline from a local directory "
            "(save_pretrained format)"
        )
    if not path.is_dir():
        raise ConfigError(
            f"{option} {path} is a file; give the model's directory (save_pretrained format: config.json, "
            "weights and tokenizer files)"
        )
    if (path / "adapter_config.json").is_file():
        return
    if not (path / "config.json").is_file():
        raise ConfigError(f"{option} {path} has no config.json; is it a model saved with save_pretrained?")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"{option} {path} has no weights ({' or '.join(WEIGHT_FILES[::2])})")
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{option} {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])} ...): save the "
            f"tokenizer there with tokenizer.save_pretrained('{path}'), or give --tokenizer DIR"
        )


def check_tokenizer_dir(path: Any, option: str = "--tokenizer") -> None:
    """Refuse a tokenizer path that is not a directory holding tokenizer files (an instance passes)."""
    if not isinstance(path, str | Path):
        return
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{option} {path} is {'a file' if path.exists() else 'missing'}; give a directory")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{option} {path} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])} ...)")


# ---------------------------------------------------------------------------------------------------
# devices

#: Device types tether runs on.
DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(name: str, option: str = "--device") -> None:
    """Refuse a device string torch cannot read, a device type tether does not run on, or a device that
    is not here (``cuda`` without CUDA, ``cuda:3`` on a two-GPU machine, ``mps`` off Apple silicon)."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{option} {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in DEVICE_TYPES:
        raise ConfigError(f"{option} {name!r}: tether runs on {', '.join(DEVICE_TYPES)} (or auto)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(
                f"{option} {name!r}, but CUDA is not available ({why}); use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{option} {name!r}, but this machine has {count} CUDA device(s): cuda:0..{count - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"{option} {name!r}, but MPS (Apple silicon) is not available; use --device cpu or auto"
        )


def check_run_inputs(
    output_dir: str | Path,
    device: str,
    model: Any,
    tokenizer: Any = None,
    model_option: str = "--policy",
) -> None:
    """The paths and the device of a training run, checked before anything touches the run directory or
    loads a model: the output directory, the device, the model directory (with tokenizer files unless a
    ``tokenizer`` is given) and the tokenizer directory."""
    check_output_dir(output_dir)
    check_device(device)
    check_model_dir(model, model_option, tokenizer=tokenizer is None)
    check_tokenizer_dir(tokenizer)
