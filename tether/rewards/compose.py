"""`build_reward`: turn a spec (function, ``file.py:fn``, built-in name, model directory, model instance, or a
list of them) into one :class:`Reward` that scores a batch and reports each component.

Composition: ``scores = sum_i weight_i * components[name_i]``. With ``baseline="prompt"`` each component is
``r(prompt + response) - r(prompt)`` before weighting — the TRL training FAQ's fix for a reward dominated by
the prompt, which the policy cannot change: subtracting it leaves the part the response is responsible for.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.rewards.base import (
    RewardError,
    RewardFunction,
    RewardFunctionError,
    RewardOutput,
    call_reward_function,
    validate_scores,
)
from tether.rewards.model import check_one_label, load_reward_model, model_name, score_texts
from tether.rewards.verifiable import VERIFIABLE_REWARDS, build_verifiable, is_verifiable_spec

Baseline = Literal["none", "prompt"]
RewardSpec = Any  # RewardFunction | str | PreTrainedModel | tuple[model, tokenizer] | list of those


class _Scorer(Protocol):
    """One component of a :class:`Reward`: scores rows, and prompts alone for the prompt baseline."""

    name: str

    def score(
        self, prompts: list[str], responses: list[str], columns: Mapping[str, Sequence[Any]]
    ) -> torch.Tensor:
        """[B] prompts and responses -> [B] float32 scores."""
        ...

    def score_prompts(self, prompts: list[str], columns: Mapping[str, Sequence[Any]]) -> torch.Tensor:
        """[B] prompts alone -> [B] float32 scores, r(prompt)."""
        ...


@dataclass
class _FunctionScorer:
    fn: RewardFunction
    name: str

    def score(
        self, prompts: list[str], responses: list[str], columns: Mapping[str, Sequence[Any]]
    ) -> torch.Tensor:
        values = call_reward_function(self.fn, self.name, prompts, responses, columns)
        return validate_scores(values, len(prompts), self.name)

    def score_prompts(self, prompts: list[str], columns: Mapping[str, Sequence[Any]]) -> torch.Tensor:
        # r(prompt) for a function is its score of the empty response.
        return self.score(prompts, [""] * len(prompts), columns)


@dataclass
class _ModelScorer:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    batch_size: int
    max_length: int | None

    def _texts(self, texts: list[str]) -> torch.Tensor:
        return score_texts(
            self.model, self.tokenizer, texts, batch_size=self.batch_size, max_length=self.max_length
        )

    def score(
        self, prompts: list[str], responses: list[str], columns: Mapping[str, Sequence[Any]]
    ) -> torch.Tensor:
        # Decoded strings, re-tokenised by the reward model's own tokenizer: the policy's tokenizer may differ.
        return self._texts([p + r for p, r in zip(prompts, responses, strict=True)])

    def score_prompts(self, prompts: list[str], columns: Mapping[str, Sequence[Any]]) -> torch.Tensor:
        # GRPO repeats each prompt G times: score each distinct prompt once.
        unique = list(dict.fromkeys(prompts))
        by_prompt = dict(zip(unique, self._texts(unique).tolist(), strict=True))
        return torch.tensor([by_prompt[p] for p in prompts], dtype=torch.float32)


class Reward:
    """A weighted sum of reward components, called once per rollout batch.

    Attributes:
        names: one unique name per component, the keys of ``RewardOutput.components``.
        weights: one weight per component.
        baseline: ``"none"`` or ``"prompt"`` (subtract each component's score of the prompt alone).
        models: the sequence-classification models among the components (may be empty), e.g. to move them.
        tokenizers: the tokenizer of each of ``models``, in the same order.
    """

    def __init__(self, scorers: Sequence[_Scorer], weights: Sequence[float], baseline: Baseline) -> None:
        if baseline not in get_args(Baseline):
            raise RewardError(f"baseline must be one of {get_args(Baseline)}, got {baseline!r}")
        if len(weights) != len(scorers):
            raise RewardError(f"got {len(weights)} weights for {len(scorers)} reward components")
        for weight in weights:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise RewardError(f"reward weights must be finite numbers, got {weight!r}")
        self._scorers = list(scorers)
        self.names: list[str] = [s.name for s in scorers]
        self.weights: list[float] = [float(w) for w in weights]
        self.baseline: Baseline = baseline
        self.models: list[PreTrainedModel] = [s.model for s in scorers if isinstance(s, _ModelScorer)]
        self.tokenizers: list[PreTrainedTokenizerBase] = [
            s.tokenizer for s in scorers if isinstance(s, _ModelScorer)
        ]

    def __call__(
        self,
        prompts: list[str],
        responses: list[str],
        columns: Mapping[str, Sequence[Any]] | None = None,
        step: int | None = None,
    ) -> RewardOutput:
        """Score [B] (prompt, response) rows; ``columns`` are extra [B] dataset columns passed to functions.

        ``step``: the training step being scored, named in the error when a reward function raises.
        """
        try:
            return self._score(prompts, responses, columns)
        except RewardFunctionError as err:
            err.step = step
            raise

    def _score(
        self, prompts: list[str], responses: list[str], columns: Mapping[str, Sequence[Any]] | None
    ) -> RewardOutput:
        n_rows = len(prompts)
        if len(responses) != n_rows:
            raise RewardError(f"got {n_rows} prompts but {len(responses)} responses")
        columns = dict(columns or {})
        for key, values in columns.items():
            if len(values) != n_rows:
                raise RewardError(f"column {key!r} has {len(values)} values for {n_rows} rows")
        components: dict[str, torch.Tensor] = {}
        total = torch.zeros(n_rows, dtype=torch.float32)
        for scorer, weight in zip(self._scorers, self.weights, strict=True):
            score = scorer.score(prompts, responses, columns)  # [B]
            if self.baseline == "prompt":
                score = score - scorer.score_prompts(prompts, columns)
            components[scorer.name] = score
            total = total + weight * score
        return RewardOutput(scores=total, components=components)

    def __repr__(self) -> str:
        parts = ", ".join(f"{w:g}*{n}" for n, w in zip(self.names, self.weights, strict=True))
        return f"Reward({parts}, baseline={self.baseline!r})"


def load_function(spec: str) -> RewardFunction:
    """Import ``"path/to/file.py:function"`` (or ``"package.module:function"``) and return the function."""
    target, _, fn_name = spec.rpartition(":")
    if not target or not fn_name:
        raise RewardError(f"reward {spec!r} must look like 'path/to/file.py:function'")
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise RewardError(f"reward file {target!r} not found")
        module_name = f"_tether_reward_{os.path.splitext(os.path.basename(target))[0]}"
        module_spec = importlib.util.spec_from_file_location(module_name, target)
        if module_spec is None or module_spec.loader is None:
            raise RewardError(f"reward file {target!r} cannot be imported")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            raise RewardError(
                f"reward file {target!r} failed to import: {type(err).__name__}: {err}"
            ) from err
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise RewardError(f"reward module {target!r} cannot be imported: {err}") from err
    fn = getattr(module, fn_name, None)
    if fn is None:
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise RewardError(
            f"reward file {target!r} has no function {fn_name!r} (it defines: {', '.join(found)})"
        )
    if not callable(fn):
        raise RewardError(f"reward {fn_name!r} in {target!r} is a {type(fn).__name__}, not a function")
    return fn


def _function_name(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__)


def _scorer(
    spec: RewardSpec, *, device: torch.device | str, max_length: int | None, batch_size: int
) -> _Scorer:
    if isinstance(spec, tuple):
        if len(spec) != 2 or not isinstance(spec[0], PreTrainedModel):
            raise RewardError("a reward model must be given as a (model, tokenizer) tuple")
        model, tokenizer = spec
        check_one_label(model)
        return _ModelScorer(model.to(device).eval(), tokenizer, model_name(model), batch_size, max_length)
    if isinstance(spec, PreTrainedModel):
        raise RewardError(
            f"reward model {model_name(spec)!r} needs its tokenizer: pass (model, tokenizer) instead of the model"
        )
    if isinstance(spec, str):
        # An existing path keeps its meaning, so a model directory named like a built-in still loads.
        if is_verifiable_spec(spec) and not os.path.exists(spec):
            fn = build_verifiable(spec)
            return _FunctionScorer(fn, _function_name(fn))
        if os.path.isdir(spec):
            model, tokenizer = load_reward_model(spec, device=device)
            path = os.path.normpath(spec)
            name = os.path.basename(path)
            if name == "final" or name.startswith("step-"):  # runs/rm/final -> "rm", not "final"
                name = (
                    os.path.basename(
                        os.path.dirname(os.path.dirname(path))
                        if name.startswith("step-")
                        else os.path.dirname(path)
                    )
                    or name
                )
            return _ModelScorer(model, tokenizer, name, batch_size, max_length)
        if ":" in spec:
            fn = load_function(spec)
            return _FunctionScorer(fn, _function_name(fn))
        raise RewardError(
            f"reward {spec!r} is neither a model directory nor 'path/to/file.py:function'"
            f" nor a built-in ({', '.join(VERIFIABLE_REWARDS)})"
        )
    if callable(spec):
        return _FunctionScorer(spec, _function_name(spec))
    raise RewardError(f"cannot build a reward from a {type(spec).__name__}")


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def build_reward(
    spec: RewardSpec,
    *,
    weights: Sequence[float] | None = None,
    baseline: Baseline = "none",
    device: torch.device | str = "cpu",
    max_length: int | None = None,
    batch_size: int = 16,
) -> Reward:
    """Build a :class:`Reward` from one spec or a list of specs.

    A spec is a reward function (named by its ``name`` attribute or ``__name__``), ``"path/to/file.py:fn"``,
    a directory holding a one-label ``AutoModelForSequenceClassification`` and its tokenizer, a
    ``(model, tokenizer)`` tuple, or a built-in verifiable reward by name (``"exact_match"``,
    ``"numeric_match:tolerance=0.01,column=solution"``, ``"regex:PATTERN"``; see
    :mod:`tether.rewards.verifiable`). A built-in name shadows a Python module of the same name in
    ``"module:fn"``; an existing path is never read as a built-in. ``weights`` default to 1.0 each. Reward
    models are moved to ``device``, scored in micro-batches of ``batch_size`` and read at the last valid
    token; texts longer than the context are an error unless ``max_length`` is set (then they are cut from
    the left). A model carrying a normalisation gain/bias (``normalize_reward_model``) applies it.
    """
    specs = list(spec) if isinstance(spec, list) else [spec]
    if not specs:
        raise RewardError("build_reward needs at least one reward")
    if batch_size < 1:
        raise RewardError(f"batch_size must be positive, got {batch_size}")
    scorers = [_scorer(s, device=device, max_length=max_length, batch_size=batch_size) for s in specs]
    for scorer, name in zip(scorers, _unique([s.name for s in scorers]), strict=True):
        scorer.name = name
    return Reward(scorers, [1.0] * len(scorers) if weights is None else list(weights), baseline)
