"""The reward contract shared by every trainer: a Protocol for reward functions, the result type, the error.

A *reward function* is any callable ``fn(prompts, responses, **columns) -> Sequence[float]`` returning one
score per (prompt, response) row. Extra dataset columns (a reference answer, a test case ...) arrive as
keyword arguments, each a sequence with one entry per row, so a function takes only the columns it needs
(``**kwargs`` swallows the rest) — the same calling convention as TRL's GRPO reward functions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch


@runtime_checkable
class RewardFunction(Protocol):
    """A programmatic reward: one float per row.

    ``prompts`` and ``responses`` are [B] lists of strings; every entry of ``columns`` is a [B] sequence.
    """

    def __call__(self, prompts: list[str], responses: list[str], **columns: Any) -> Sequence[float]: ...


class RewardOutput(NamedTuple):
    """What :class:`tether.rewards.Reward` returns for a batch.

    Attributes:
        scores: [B] float32, the weighted total ``sum_i weight_i * components[name_i]`` used for RL.
        components: name -> [B] float32 unweighted score of each component (after the prompt baseline when
            one is configured). Always has one entry per component, also when there is only one.
    """

    scores: torch.Tensor
    components: dict[str, torch.Tensor]


class RewardError(ValueError):
    """A reward could not be built or returned an unusable value.

    Messages name the reward function or model, the row index and the problem, so that the failing row of a
    rollout batch can be found without a debugger.
    """


def validate_scores(values: object, n_rows: int, name: str) -> torch.Tensor:
    """Check a reward function's output and turn it into a [B] float32 tensor.

    Accepts any sequence of real numbers (Python, NumPy or 0-d tensors; bools count as 0/1), a 1-D NumPy array
    or a 1-D tensor. Raises :class:`RewardError` naming ``name``, the first bad row and its value when the
    length is not ``n_rows`` or a value is not a finite real number — a NaN reward would otherwise propagate
    silently into advantages and the loss.
    """
    if isinstance(values, torch.Tensor) or hasattr(values, "tolist"):
        values = values.tolist()  # type: ignore[union-attr]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardError(
            f"reward {name!r} must return a sequence of {n_rows} floats, got {type(values).__name__}"
        )
    if len(values) != n_rows:
        raise RewardError(f"reward {name!r} returned {len(values)} values for {n_rows} rows")
    out: list[float] = []
    for i, value in enumerate(values):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise RewardError(
                f"reward {name!r} row {i}: value {value!r} ({type(value).__name__}) is not a number"
            )
        as_float = float(value)
        if not math.isfinite(as_float):
            raise RewardError(f"reward {name!r} row {i}: value {as_float!r} is not finite")
        out.append(as_float)
    return torch.tensor(out, dtype=torch.float32)
