"""The run layer every trainer shares: the run directory, ``inputs.yaml``, logging, checkpoints and resume.

A run directory holds ``config.yaml``, ``inputs.yaml`` (the inputs given as paths, so ``--resume DIR`` needs
nothing else), ``metrics.jsonl``, ``samples.jsonl``, ``checkpoints/step-N/`` and ``final/`` (loadable with
``from_pretrained``), and ``report.html``. A trainer calls, in order: :func:`claim_run_dir` (a fresh run only),
:func:`open_run` (writes the config and inputs, builds loggers, progress bar and health monitor),
:func:`save_run_checkpoint` every ``save_steps``, and :func:`finish_run` at the end. :func:`load_run_checkpoint`
restores a run for ``--resume``; :class:`LoopState` is the training state every RL trainer checkpoints.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
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
    save_checkpoint,
    save_pretrained_atomic,
    set_rng_state,
)
from tether.config import ConfigError, save_yaml, to_dict
from tether.data import PromptSampler
from tether.health import HealthMonitor, HealthWarning
from tether.kl import KLController
from tether.logging import MultiLogger, Progress, build_loggers
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

#: What a run writes into its directory; a fresh run refuses a directory holding any of them.
RUN_DIR_OUTPUTS = ("metrics.jsonl", "samples.jsonl", "checkpoints", "final", "report.html", "tensorboard")
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


def claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to mix a new run into a directory holding another, unless ``overwrite`` says to replace it."""
    earlier = [name for name in RUN_DIR_OUTPUTS if (run_dir / name).exists()]
    if not earlier:
        return
    if not overwrite:
        raise ConfigError(
            f"output_dir {run_dir} already holds a run ({', '.join(earlier)}); resume it with "
            "--resume, choose another output_dir, or set overwrite_output_dir=true to replace it"
        )
    for name in earlier:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


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
) -> RunOutputs:
    """Write ``config.yaml`` and ``inputs.yaml``, then build the loggers, progress bar and health monitor.

    ``config`` must have a ``logging`` block (:class:`tether.config.LoggingConfig`). ``resumed_step`` is the
    step a resumed run starts from (loggers drop records past it), None for a fresh run. A process that is not
    the main one writes nothing: its loggers are no-ops and it shows no progress bar.
    """
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, run_dir / "config.yaml")
        if inputs:
            (run_dir / INPUTS_FILE).write_text(yaml.safe_dump(inputs, sort_keys=False))
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
    return RunOutputs(logger, progress, HealthMonitor(max_new_tokens=max_new_tokens))


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
    weights = full_state_dict(policy) if is_sharded(policy) else None
    on_main(backend, finish_run, policy, tokenizer, run_dir, weights)


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
        if self.sharded:
            assert self.trained is not None
            named = saved if by_name else optimizer_state_by_name(self.trained, saved)
            load_optimizer_state(self.trained, self.optimizer, named)
        elif by_name:
            if self.trained is None:
                raise ValueError("this checkpoint's optimiser state is keyed by name: LoopState needs `trained`")
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
    weights = full_state_dict(policy) if state.sharded else None
    return on_main(backend, save_checkpoint, run_dir, state.step, policy, tokenizer, payload, keep, weights)


def load_run_checkpoint(run_dir: Path, policy: nn.Module, state: LoopState, extra: dict[str, Any]) -> Path:
    """Restore the newest checkpoint of ``run_dir`` into ``policy`` and ``state``; returns its path."""
    ckpt = latest_checkpoint(run_dir)
    saved = load_state(ckpt)
    load_policy_weights(policy, ckpt)
    state.load_state_dict(saved, extra)
    set_rng_state(saved["rng"])
    return ckpt


def linear_schedule(total_updates: int, kind: str) -> Callable[[int], float]:
    """The learning-rate multiplier of optimiser step ``i``: linear decay to 0, or constant."""
    if kind == "linear":
        return lambda i: max(0.0, 1.0 - i / max(total_updates, 1))
    return lambda i: 1.0
