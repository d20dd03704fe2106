"""The reward contract shared by every trainer: a Protocol for reward functions, the result type, the error.

A *reward function* is any callable ``fn(prompts, responses, **columns) -> Sequence[float]`` returning one
score per (prompt, response) row. Extra dataset columns (a reference answer, a test case ...) arrive as
keyword arguments, each a sequence with one entry per row, so a function takes only the columns it needs
(``**kwargs`` swallows the rest) — the same calling convention as TRL's GRPO reward functions.
"""

from __future__ import annotations

import math
import numbers
import os
import traceback
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


class RewardFunctionError(RewardError):
    """The user's reward function raised: names the function, the training step when known, the exception, and
    the traceback lines of the user's own code (tether's frames are left out: the bug is in the function).

    ``step`` is filled in by :class:`tether.rewards.Reward` when its caller passes one.
    """

    def __init__(self, name: str, error: BaseException, user_traceback: str, step: int | None = None) -> None:
        super().__init__(name, error, user_traceback, step)
        self.name = name
        self.error = error
        self.user_traceback = user_traceback
        self.step = step

    def __str__(self) -> str:
        when = f" at step {self.step}" if self.step is not None else ""
        head = f"reward {self.name} raised{when}: {type(self.error).__name__}: {self.error}"
        return f"{head}\n{self.user_traceback.rstrip()}" if self.user_traceback.strip() else head


def user_traceback(error: BaseException) -> str:
    """The traceback lines of ``error`` outside the tether package: the user's own frames (and those of any
    library their code called), without the frames of tether that called them."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not os.path.abspath(frame.filename).startswith(package + os.sep)
    ]
    return "".join(traceback.format_list(frames))


def call_reward_function(
    fn: RewardFunction, name: str, prompts: list[str], responses: list[str], columns: Any
) -> Any:
    """``fn(prompts, responses, **columns)``; an exception it raises becomes a :class:`RewardFunctionError`."""
    try:
        return fn(prompts, responses, **columns)
    except Exception as err:  # noqa: BLE001 - any bug in the user's function, reported as theirs
        raise RewardFunctionError(name, err, user_traceback(err)) from err


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
