"""Numerical faults: a NaN or inf in what an update reads or computes skips that update instead of training on it.

Before a step's update the trainers check its inputs (advantages, old and reference logprobs, values, KL; on the
response tokens only) with :func:`nonfinite_inputs`; during it, :func:`tether.trainers.common.run_updates` checks
each mini-batch's loss and the summed gradients (:func:`finite_gradients`) and skips the optimiser step when one
is not finite. :class:`NonFiniteGuard` counts the steps in a row that skipped something, warns each time naming
what and where, and stops the run with :class:`NumericalError` after ``max_nonfinite_steps`` of them, before a
NaN can reach the weights (and so a checkpoint).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from tether.backend import Backend


class NumericalError(ValueError):
    """Too many steps in a row had NaN / inf in an update's inputs, loss or gradients."""


def nonfinite_inputs(named: Mapping[str, torch.Tensor | None], mask: torch.Tensor) -> list[str]:
    """``"advantages: 3 NaN/inf values in rows [0, 5]"`` for each [B, T] (or [B]) tensor of ``named`` that holds
    a non-finite value where ``mask`` [B, T] is True (a [B] tensor: in any row); empty when all are finite."""
    problems = []
    for name, value in named.items():
        if value is None:
            continue
        bad = ~torch.isfinite(value.float())
        bad = bad & mask if bad.dim() == 2 else bad
        if bad.any():
            rows = torch.nonzero(bad.reshape(bad.shape[0], -1).any(-1)).flatten().tolist()
            shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
            problems.append(f"{name}: {int(bad.sum())} NaN/inf values in rows [{shown}]")
    return problems


def finite_gradients(params: Iterable[nn.Parameter], backend: Backend, local_ok: bool = True) -> bool:
    """Whether every gradient is finite (and ``local_ok``) on every process; a sharded gradient is checked
    shard by shard, and the answer is the same on every process."""
    checks = []
    for p in params:
        if p.grad is not None:
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            checks.append(torch.isfinite(grad).all())
    ok = local_ok and (bool(torch.stack(checks).all()) if checks else True)
    if backend.world_size > 1:
        bad = backend.all_reduce_sum(torch.tensor([0.0 if ok else 1.0], dtype=torch.float64))
        ok = float(bad[0]) == 0
    return ok


class NonFiniteGuard:
    """Counts the steps in a row whose update skipped something non-finite; stops the run after ``limit``.

    ``limit`` 0 never stops (each skip still warns).
    """

    def __init__(self, limit: int, is_main: bool = True) -> None:
        self.limit = limit
        self.is_main = is_main
        self.in_a_row: list[str] = []

    def after_step(self, step: int, problems: list[str]) -> None:
        """Record step ``step``'s problems (empty: a clean step, which resets the count); warn, and raise
        :class:`NumericalError` once ``limit`` steps in a row had some."""
        if not problems:
            self.in_a_row = []
            return
        what = "; ".join(problems)
        self.in_a_row.append(f"step {step}: {what}")
        if self.is_main:
            print(f"warning: step {step}: skipped an update: {what}", file=sys.stderr, flush=True)
        if self.limit and len(self.in_a_row) >= self.limit:
            raise NumericalError(
                f"{len(self.in_a_row)} steps in a row had NaN/inf values, so their updates were skipped "
                f"({' | '.join(self.in_a_row)}); stopping before they reach the weights or a checkpoint. The "
                "usual causes: a learning rate too high, no gradient clipping (set max_grad_norm), fp16 overflow "
                "(prefer bf16 or fp32), a reward of extreme magnitude (try reward normalisation or reward_clip). "
                "Resume from the last checkpoint with a fix (max_nonfinite_steps sets how many are tolerated)"
            )
