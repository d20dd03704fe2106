"""The run layer every trainer shares: the run directory, ``inputs.yaml``, logging, checkpoints and resume.

A run directory holds ``run.json`` (the run's id), ``config.yaml``, ``inputs.yaml`` (the inputs given as paths,
so ``--resume DIR`` needs nothing else), ``metrics.jsonl``, ``samples.jsonl``, ``checkpoints/step-N/`` and
``final/`` (loadable with ``from_pretrained``), ``report.html``, and ``.lock``. A trainer calls, in order:
:func:`claim_run_dir` (a fresh run only), :func:`open_run` (writes the config and inputs, builds loggers,
progress bar and health monitor), :func:`save_run_checkpoint` every ``save_steps``, and :func:`finish_run` at
the end. :func:`load_run_checkpoint` restores a run for ``--resume``; :class:`LoopState` is the training state
every RL trainer checkpoints.

Ownership: while a run is live its process holds an exclusive ``flock`` on ``run_dir/.lock`` (which records its
PID and host). The kernel drops the lock when the process exits or dies, so a killed run's lock is taken over by
the next one, while a second writer, or a resume of a live run, is refused naming the PID. Under ``torchrun``
only rank 0 takes it. ``run.json`` records the run id given at creation: a resumed run writes only into its own
directory, into a copy of it (the same id), or into a directory holding no run. Leftover temporary directories
of killed saves are removed whenever the lock is taken.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from torch import nn

from tether.backend import Backend, on_main
from tether.checkpoint import (
    latest_checkpoint,
    load_policy_weights,
    load_state,
    remove_temp_dirs,
    save_checkpoint,
    save_pretrained_atomic,
    set_rng_state,
)
from tether.config import ConfigError, save_yaml, to_dict
from tether.data import PromptSampler
from tether.health import HealthMonitor, HealthWarning
from tether.kl import KLController
from tether.logging import Logger, MultiLogger, Progress, build_loggers
from tether.models import mergeable_copy
from tether.report import build_report
from tether.rewards import RunningNorm
from tether.sharding import (
    full_optimizer_state,
    full_state_dict,
    is_sharded,
    load_full_state_dict,
    load_optimizer_state,
    optimizer_state_by_name,
    optimizer_state_by_position,
)
from tether.zero import load_zero_optimizer_state, whole_state_dict, zero_managed, zero_optimizer_state

#: What a run writes into its directory; a fresh run refuses a directory holding any of them.
RUN_DIR_OUTPUTS = (
    "metrics.jsonl",
    "samples.jsonl",
    "kl_tokens.jsonl",
    "checkpoints",
    "final",
    "report.html",
    "tensorboard",
)
#: The run's inputs given as paths (policy, tokenizer, prompts, reward), so ``--resume DIR`` needs no more.
INPUTS_FILE = "inputs.yaml"


def input_specs(**inputs: Any) -> dict[str, str | list[str]]:
    """The inputs given as paths or ``file.py:function`` strings (a list for composed rewards), as text.

    Model instances, functions and in-memory datasets cannot be written down; they are left out.
    """

    def absolute(spec: str | Path) -> str:
        # Relative paths are made absolute so a resume from another working directory finds them.
        text = str(spec)
        path, sep, fn = text.rpartition(":")
        if not (sep and path.endswith(".py")):  # a directory or file, not "file.py:function"
            path, sep, fn = text, "", ""
        try:
            exists = Path(path).exists()
        except OSError:  # not a path at all (a prompt longer than a file name may be)
            exists = False
        return str(Path(path).resolve()) + sep + fn if exists else text

    out: dict[str, str | list[str]] = {}
    for name, value in inputs.items():
        if isinstance(value, str | Path):
            out[name] = absolute(value)
        elif isinstance(value, list | tuple) and value and all(isinstance(v, str | Path) for v in value):
            out[name] = [absolute(v) for v in value]
    return out


def read_inputs(run_dir: str | Path) -> dict[str, Any]:
    """The ``inputs.yaml`` of a run directory ({} when it has none)."""
    path = Path(run_dir) / INPUTS_FILE
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


#: The file whose ``flock`` a live run holds (it records the holder's PID and host).
LOCK_FILE = ".lock"
#: The run's identity, written when the run is created: ``{"run_id": ..., "created": ..., ...}``.
RUN_FILE = "run.json"


class RunDirError(ConfigError):
    """A run directory that is in use by a live run, or that holds another run than the one being resumed."""


def is_main_process() -> bool:
    """Whether this process writes the run directory: rank 0 under a launcher (``RANK``), else always."""
    return int(os.environ.get("RANK", "0")) == 0


#: The run-directory locks this process holds: resolved directory -> open file descriptor of its ``.lock``.
_held_locks: dict[str, int] = {}


def _lock_key(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


def _describe_holder(fd: int) -> str:
    """``PID 123 on host`` from a lock file's contents (what its holder wrote), or a plain phrase."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if "pid" not in info:
        return "another process"
    return f"PID {info['pid']} on {info.get('host', '?')}"


def _refuse_live(run_dir: Path, fd: int) -> RunDirError:
    holder = _describe_holder(fd)
    os.close(fd)
    return RunDirError(
        f"{run_dir} is in use by a live run ({holder}, holding {run_dir / LOCK_FILE}); wait for it to finish "
        "or stop it, or choose another output_dir"
    )


def check_not_live(run_dir: Path) -> None:
    """Refuse ``run_dir`` when another process holds its lock; creates and changes nothing."""
    path = Path(run_dir) / LOCK_FILE
    if _lock_key(run_dir) in _held_locks or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refuse_live(Path(run_dir), fd) from None
    os.close(fd)  # closing drops the shared lock we took


def acquire_run_lock(run_dir: Path) -> None:
    """Take ``run_dir/.lock`` for this process (a no-op when it already holds it), then remove the temporary
    directories that killed saves left behind. A lock left by a dead process is taken over, with a note."""
    run_dir = Path(run_dir)
    key = _lock_key(run_dir)
    if key in _held_locks:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refuse_live(run_dir, fd) from None
    previous = _describe_holder(fd)
    if previous != "another process":  # the holder died without releasing (a clean release empties the file)
        print(
            f"note: {run_dir} was left locked by {previous}, which is no longer running; taking it over",
            file=sys.stderr,
        )
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held_locks[key] = fd
    for path in remove_temp_dirs(run_dir):
        print(f"note: removed {path}, left by an interrupted save", file=sys.stderr)


def release_run_lock(run_dir: Path) -> None:
    """Give up ``run_dir``'s lock if this process holds it (emptying the file marks a clean release)."""
    fd = _held_locks.pop(_lock_key(run_dir), None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass  # the lock is dropped below all the same
    os.close(fd)


class _ReleaseLocks:
    """The last of a run's loggers: closing it (after the others have flushed) releases the run's locks.
    Implements ``Logger``."""

    def __init__(self, run_dirs: Sequence[Path]) -> None:
        self.run_dirs = list(run_dirs)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Nothing to record."""

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Nothing to record."""

    def close(self) -> None:
        for run_dir in self.run_dirs:
            release_run_lock(run_dir)


def with_lock_release(logger: MultiLogger, run_dirs: Sequence[Path]) -> MultiLogger:
    """``logger`` whose ``close()`` also releases the locks of ``run_dirs`` (after flushing the logs)."""
    release: Logger = _ReleaseLocks(run_dirs)
    return MultiLogger([*logger.loggers, release])


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_run_id(run_dir: Path) -> str | None:
    """The id in ``run_dir/run.json``, None when there is none (a run from before run ids, or no run)."""
    try:
        return str(json.loads((Path(run_dir) / RUN_FILE).read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_file(path: Path, text: str) -> None:
    """Write a small run file via a temporary file and a rename; a failure is one clear line."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise RunDirError(
            f"cannot write {path}: {err.strerror or err}; check the space and permissions there"
        ) from err


def record_run(run_dir: Path, run_id: str | None = None, **info: Any) -> str:
    """Write ``run_dir/run.json`` with ``run_id`` (a new one when None); returns the id."""
    run_id = run_id or uuid.uuid4().hex
    record = {"run_id": run_id, "created": _now(), "host": socket.gethostname(), **info}
    _write_file(Path(run_dir) / RUN_FILE, json.dumps(record, indent=1) + "\n")
    return run_id


def _earlier_outputs(run_dir: Path) -> list[str]:
    return [name for name in RUN_DIR_OUTPUTS if (run_dir / name).exists()]


def claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Take ``run_dir`` for a new run: refuse a live one, and a directory holding another run unless
    ``overwrite`` says to replace it; then lock it and record a new run id in ``run.json``."""
    run_dir = Path(run_dir)
    check_not_live(run_dir)
    earlier = _earlier_outputs(run_dir)
    if earlier and not overwrite:
        raise RunDirError(
            f"output_dir {run_dir} already holds a run ({', '.join(earlier)}); resume it with "
            "--resume, choose another output_dir, or set overwrite_output_dir=true to replace it"
        )
    acquire_run_lock(run_dir)
    for name in _earlier_outputs(run_dir):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    record_run(run_dir)


def restart_interrupted_run(run_dir: Path) -> list[str]:
    """For ``--resume auto`` finding no complete checkpoint: remove what an attempt interrupted before its first
    checkpoint left (its logs), so the same command starts afresh; returns the names removed.

    A directory holding ``final/`` (a finished run without checkpoints) is refused, not replaced.
    """
    run_dir = Path(run_dir)
    check_not_live(run_dir)
    earlier = _earlier_outputs(run_dir)
    if not earlier:
        return []
    if "final" in earlier:
        raise RunDirError(
            f"--resume auto: output_dir {run_dir} holds a finished run (final/) and no complete checkpoint to "
            "continue from; choose another output_dir, or set overwrite_output_dir=true to replace it"
        )
    acquire_run_lock(run_dir)
    for name in earlier:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(
        f"note: {run_dir} has no complete checkpoint: starting afresh (removed {', '.join(earlier)} of the "
        "interrupted attempt)",
        file=sys.stderr,
    )
    return earlier


def check_resume_target(output_dir: Path, source: Path) -> None:
    """Refuse to write a run resumed from ``source`` into ``output_dir`` when that holds a different run.

    Allowed: the same directory, a directory with the same run id (a copy), or one holding no run at all.
    Reads only: nothing is created or changed in either directory.
    """
    output_dir, source = Path(output_dir), Path(source)
    if output_dir.resolve() == source.resolve():
        return
    mine, theirs = read_run_id(source), read_run_id(output_dir)
    if theirs is not None and theirs == mine:
        return
    if theirs is None and not _earlier_outputs(output_dir):
        return
    what = f"run {theirs}" if theirs is not None else f"a run ({', '.join(_earlier_outputs(output_dir))})"
    raise RunDirError(
        f"cannot resume {source} into output_dir {output_dir}: it holds another {what}; nothing there was "
        f"changed. Leave output_dir unset to continue in {source}, or give an empty output_dir"
    )


def enter_run_dir(run_dir: Path, source: Path | None) -> list[Path]:
    """The main process's part of opening ``run_dir`` for writing: for a run resumed from ``source``, check
    that ``run_dir`` holds no other run (before anything is written), then lock it (removing leftover temporary
    directories) and make sure ``run.json`` names the run. Returns the directories whose locks the run holds."""
    run_dir = Path(run_dir)
    if source is not None:
        check_resume_target(run_dir, source)
    acquire_run_lock(run_dir)
    if source is not None:
        check_resume_target(run_dir, source)  # again, under the lock
    if read_run_id(run_dir) is None:
        from_run = read_run_id(source) if source is not None else None
        extra = {"resumed_from": str(Path(source).resolve())} if source is not None else {}
        record_run(run_dir, from_run, **extra)
    locked = [run_dir]
    if source is not None and _lock_key(source) != _lock_key(run_dir):
        locked.append(Path(source))
    return locked


def preflight(output_dir: Path, resume: Path | None) -> None:
    """What the command line can check before loading any model: neither directory is in use by a live run,
    and a resumed run would not write into a directory holding another."""
    check_not_live(Path(output_dir))
    if resume is not None:
        check_not_live(Path(resume))
        check_resume_target(Path(output_dir), Path(resume))


def run_dir_of(ckpt: Path) -> Path:
    """The run directory of ``run_dir/checkpoints/step-N``."""
    return Path(ckpt).parent.parent


def open_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Lock ``run_dir`` (the main process; a live run is refused), pick its newest complete checkpoint (an
    incomplete or corrupt newer one is skipped with a warning) and read its trainer state."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"cannot resume: run directory {run_dir} does not exist")
    if is_main_process():
        acquire_run_lock(run_dir)
    ckpt = latest_checkpoint(run_dir)
    return ckpt, load_state(ckpt)


class RunOutputs(NamedTuple):
    """Where a running trainer reports: loggers, the progress bar and the health monitor."""

    logger: MultiLogger
    progress: Progress
    health: HealthMonitor


def open_run(
    config: Any,
    run_dir: Path,
    inputs: dict[str, Any],
    *,
    name: str,
    total_episodes: int,
    episode: int,
    resumed_step: int | None,
    max_new_tokens: int,
    is_main: bool = True,
    resumed_from: Path | None = None,
) -> RunOutputs:
    """Take ``run_dir`` (:func:`enter_run_dir`), write ``config.yaml`` and ``inputs.yaml``, then build the
    loggers, progress bar and health monitor; closing the logger releases the run directory's lock.

    ``config`` must have a ``logging`` block (:class:`tether.config.LoggingConfig`). ``resumed_step`` is the
    step a resumed run starts from (loggers drop records past it), None for a fresh run; ``resumed_from`` the
    checkpoint it was restored from (what :func:`load_run_checkpoint` returned), whose run ``run_dir`` must
    belong to. A process that is not the main one writes nothing: its loggers are no-ops and it
    shows no progress bar.
    """
    locked: list[Path] = []
    if is_main:
        source = run_dir_of(resumed_from) if resumed_step is not None and resumed_from is not None else None
        locked = enter_run_dir(run_dir, source)
        try:
            write_run_files(run_dir, config, inputs)
        except BaseException:
            for path in locked:
                release_run_lock(path)
            raise
    log = config.logging
    logger = build_loggers(
        log.report_to,
        run_dir,
        to_dict(config),
        is_main_process=is_main,
        console_every=log.logging_steps,
        start_step=resumed_step,
    )
    progress = Progress(total_episodes, name, log.progress_bar and is_main, initial=episode)
    return RunOutputs(
        with_lock_release(logger, locked), progress, HealthMonitor(max_new_tokens=max_new_tokens)
    )


def write_run_files(run_dir: Path, config: Any, inputs: dict[str, Any]) -> None:
    """``config.yaml`` and ``inputs.yaml`` (when there are inputs given as paths); a failed write is one line."""
    try:
        save_yaml(config, run_dir / "config.yaml")
    except OSError as err:
        raise RunDirError(f"cannot write {run_dir / 'config.yaml'}: {err.strerror or err}") from err
    if inputs:
        _write_file(run_dir / INPUTS_FILE, yaml.safe_dump(inputs, sort_keys=False))


def report_health(outputs: RunOutputs, metrics: dict[str, float], step: int) -> list[HealthWarning]:
    """Feed one step's metrics to the health monitor and print what it warns about."""
    warnings = outputs.health.update(metrics, step)
    for warning in warnings:
        outputs.progress.write(str(warning))
    return warnings


def finish_run(
    policy: nn.Module, tokenizer: Any, run_dir: Path, weights: dict[str, torch.Tensor] | None = None
) -> None:
    """Save ``final/``: a LoRA policy merged, so it loads with ``AutoModelForCausalLM.from_pretrained``.

    ``weights``: the whole state dict of a sharded policy (:func:`save_final` gathers it).
    """
    save_pretrained_atomic(mergeable_copy(policy), tokenizer, run_dir / "final", weights)


def save_final(backend: Backend, policy: nn.Module, tokenizer: Any, run_dir: Path) -> None:
    """:func:`finish_run` on rank 0, called on every process: a sharded policy's weights are gathered first."""
    on_main(backend, finish_run, policy, tokenizer, run_dir, whole_weights(policy))


def whole_weights(policy: nn.Module) -> dict[str, torch.Tensor] | None:
    """The policy's whole state dict when its weights are not plain tensors of its own (gathered from FSDP
    shards, a collective; cloned out of a ZeRO engine's flat buffer); None when ``save_pretrained`` can save it."""
    if is_sharded(policy):
        return full_state_dict(policy)
    return whole_state_dict(policy) if zero_managed(policy) else None


def write_report(run_dir: Path, enabled: bool) -> Path | None:
    """``run_dir/report.html`` when ``enabled`` (after the loggers are closed: it reads metrics.jsonl)."""
    return build_report([run_dir]) if enabled else None


@dataclass
class LoopState:
    """The training state an RL trainer checkpoints besides its policy weights, restored exactly on resume.

    ``extra`` holds the trainer's own stateful parts (a value model for PPO) as name -> object with
    ``state_dict`` / ``load_state_dict``. ``trained`` is the module whose parameters the optimiser steps (what
    names them when the optimiser state is saved sharded); ``grad_scaler`` the fp16 loss scaler, if any.
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    kl_ctl: KLController
    sampler: PromptSampler
    update_generator: torch.Generator
    score_norm: RunningNorm | None
    step: int = 0
    episode: int = 0
    trained: nn.Module | None = None
    grad_scaler: Any = None
    engine: Any = None  # the DeepSpeed ZeRO engine over ``trained`` under sharding: deepspeed (tether.zero)

    @property
    def sharded(self) -> bool:
        return self.trained is not None and is_sharded(self.trained)

    def state_dict(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Everything to checkpoint; a collective when the trained models are sharded (whole tensors gathered)."""
        state: dict[str, Any] = {}
        if self.sharded:
            assert self.trained is not None
            state.update({name: full_state_dict(part) for name, part in extra.items()})
            state["optimizer"] = full_optimizer_state(self.trained, self.optimizer)
            state["optimizer_keys"] = "name"  # keyed by parameter name: loads into any number of processes
        elif self.engine is not None:  # ZeRO: AdamW's partitions gathered whole, keyed by name (a collective)
            assert self.trained is not None
            state.update({name: whole_state_dict(part) for name, part in extra.items()})
            state["optimizer"] = zero_optimizer_state(self.engine, self.trained, self.optimizer)
            state["optimizer_keys"] = "name"
        else:
            state.update({name: part.state_dict() for name, part in extra.items()})
            state["optimizer"] = self.optimizer.state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return {
            **state,
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "sampler": self.sampler.state_dict(),
            "update_generator": self.update_generator.get_state(),
            "episode": self.episode,
            "score_norm": self.score_norm.state_dict() if self.score_norm is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        for name, part in extra.items():
            if is_sharded(part):
                load_full_state_dict(part, state[name])
            else:
                part.load_state_dict(state[name])
        self._load_optimizer(state["optimizer"], by_name=state.get("optimizer_keys") == "name")
        if self.grad_scaler is not None and state.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.sampler.load_state_dict(state["sampler"])
        self.update_generator.set_state(state["update_generator"])
        self.step, self.episode = int(state["step"]), int(state["episode"])
        if self.score_norm is not None and state.get("score_norm") is not None:
            self.score_norm.load_state_dict(state["score_norm"])

    def _load_optimizer(self, saved: dict[str, Any], by_name: bool) -> None:
        """A checkpoint from a sharded or a whole-model run, into a sharded or a whole-model optimiser."""
        if self.engine is not None:
            assert self.trained is not None
            named = saved if by_name else optimizer_state_by_name(self.trained, saved)
            load_zero_optimizer_state(self.engine, self.trained, self.optimizer, named)
        elif self.sharded:
            assert self.trained is not None
            named = saved if by_name else optimizer_state_by_name(self.trained, saved)
            load_optimizer_state(self.trained, self.optimizer, named)
        elif by_name:
            if self.trained is None:
                raise ValueError(
                    "this checkpoint's optimiser state is keyed by name: LoopState needs `trained`"
                )
            self.optimizer.load_state_dict(optimizer_state_by_position(self.trained, saved))
        else:
            self.optimizer.load_state_dict(saved)


def save_run_checkpoint(
    backend: Backend,
    run_dir: Path,
    policy: nn.Module,
    tokenizer: Any,
    state: LoopState,
    extra: dict[str, Any],
    keep: int,
) -> Path | None:
    """``checkpoints/step-N``: the policy (``save_pretrained``), the loop state and every RNG state.

    Call it on every process: sharded weights and optimiser state are gathered (collectives), rank 0 writes.
    """
    payload = state.state_dict(extra)
    weights = whole_weights(policy)
    return on_main(backend, save_checkpoint, run_dir, state.step, policy, tokenizer, payload, keep, weights)


def load_run_checkpoint(run_dir: Path, policy: nn.Module, state: LoopState, extra: dict[str, Any]) -> Path:
    """Restore the newest complete checkpoint of ``run_dir`` into ``policy`` and ``state``; returns its path.

    The main process locks ``run_dir`` first (a live run is refused). Inputs that no longer fit the checkpoint
    (a prompt file with another number of rows) are refused here, before anything in the run is rewritten.
    """
    ckpt, saved = open_checkpoint(run_dir)
    check_prompt_count(ckpt, saved, state.sampler)
    load_policy_weights(policy, ckpt)
    state.load_state_dict(saved, extra)
    set_rng_state(saved["rng"])
    return ckpt


def check_prompt_count(ckpt: Path, saved: dict[str, Any], sampler: PromptSampler) -> None:
    """Refuse to resume a run whose prompts changed in number (its shuffled order indexes the old rows)."""
    order = saved.get("sampler", {}).get("order") or []
    n = getattr(sampler, "n", None)
    if order and n is not None and len(order) != n:
        given = read_inputs(run_dir_of(ckpt)).get("prompts", "the prompts given")
        raise ConfigError(
            f"cannot resume from {ckpt}: the run was trained on {len(order)} prompts and {given} now has {n}; "
            "resume with the original prompt file, or start a new run in another output_dir"
        )


def linear_schedule(total_updates: int, kind: str) -> Callable[[int], float]:
    """The learning-rate multiplier of optimiser step ``i``: linear decay to 0, or constant."""
    if kind == "linear":
        return lambda i: max(0.0, 1.0 - i / max(total_updates, 1))
    return lambda i: 1.0
