"""Reward normalisation: a fixed gain/bias stored in the reward model, and a running normaliser for RL.

* :func:`normalize_reward_model` — OpenAI lm-human-preferences (Ziegler et al. 2019, ``train_reward.py``)
  normalises a trained reward model once, so that samples of the *reference* policy score mean 0 / std 1;
  the KL coefficient then means the same thing for every reward model. The gain and bias live in the model's
  config, so ``save_pretrained``/``from_pretrained`` keep them and every scoring path applies them.
* :class:`RunningNorm` — running mean/std of the scores seen so far during RL (OpenRLHF's and the
  N-implementation-details' reward scaling), for rewards whose scale drifts or is unknown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.rewards.base import RewardError
from tether.rewards.model import BIAS_KEY, GAIN_KEY, score_texts


class GainBias(NamedTuple):
    """``normalised = gain * raw + bias``."""

    gain: float
    bias: float


def gain_bias_for(raw: torch.Tensor, target_mean: float = 0.0, target_std: float = 1.0) -> GainBias:
    """[B] raw scores -> the gain/bias that maps them to ``target_mean`` and ``target_std`` (unbiased std).

    ``gain = target_std / std(raw)``, ``bias = target_mean - gain * mean(raw)``.
    """
    if raw.numel() < 2:
        raise RewardError(f"reward normalisation needs at least 2 samples, got {raw.numel()}")
    raw = raw.double()
    mean, std = raw.mean().item(), raw.std().item()
    if not math.isfinite(std) or std <= 0.0:
        raise RewardError("reward normalisation: all samples have the same score (std 0); cannot rescale")
    gain = target_std / std
    return GainBias(gain=gain, bias=target_mean - gain * mean)


def normalize_reward_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    target_mean: float = 0.0,
    target_std: float = 1.0,
    batch_size: int = 16,
    max_length: int | None = None,
) -> GainBias:
    """Set the model's gain/bias so that its scores of ``prompt + response`` samples have mean 0 and std 1.

    ``prompts`` and ``responses`` are [B] samples of the reference policy (the policy RL starts from). The raw
    head output is used, so calling this twice does not compound. The result is stored in
    ``model.config.tether_reward_gain`` / ``tether_reward_bias`` and returned.
    """
    if len(prompts) != len(responses):
        raise RewardError(f"got {len(prompts)} prompts but {len(responses)} responses")
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    raw = score_texts(
        model, tokenizer, texts, batch_size=batch_size, max_length=max_length, apply_normalization=False
    )
    result = gain_bias_for(raw, target_mean, target_std)
    setattr(model.config, GAIN_KEY, result.gain)
    setattr(model.config, BIAS_KEY, result.bias)
    return result


class RunningNorm:
    """Running mean and (unbiased) std of every score seen, merged batch by batch (Chan et al. 1979).

    Usage per RL step: ``norm.update(scores)`` then ``norm.normalize(scores)``, which returns
    ``(scores - mean) / (std + eps)`` (only ``/ (std + eps)`` with ``shift_mean=False``), clipped to
    ``[-clip, clip]`` when ``clip`` is set. Statistics are kept in float64 so that millions of samples do not
    lose precision; ``state_dict``/``load_state_dict`` make a resumed run exact.
    """

    def __init__(self, clip: float | None = None, shift_mean: bool = True, eps: float = 1e-8) -> None:
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be positive, got {clip}")
        self.clip = clip
        self.shift_mean = shift_mean
        self.eps = eps
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean

    @property
    def var(self) -> float:
        """Unbiased variance of all scores seen; needs at least two."""
        if self.count < 2:
            raise ValueError(f"RunningNorm needs at least 2 scores before normalising, has {self.count}")
        return self._m2 / (self.count - 1)

    @property
    def std(self) -> float:
        """Unbiased standard deviation of all scores seen."""
        return math.sqrt(self.var)

    def update(self, scores: torch.Tensor) -> None:
        """Merge a [B] batch of scores into the running statistics."""
        batch = scores.detach().double().flatten().cpu()
        n = batch.numel()
        if n == 0:
            return
        if not bool(torch.isfinite(batch).all()):
            raise ValueError("RunningNorm.update got a non-finite score")
        batch_mean = batch.mean().item()
        batch_m2 = ((batch - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self._m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """[B] scores -> [B] normalised with the current statistics (same dtype and device)."""
        out = scores - self.mean if self.shift_mean else scores
        out = out / (self.std + self.eps)
        if self.clip is not None:
            out = out.clamp(-self.clip, self.clip)
        return out

    def state_dict(self) -> dict[str, float]:
        """The statistics, for checkpoints."""
        return {"count": float(self.count), "mean": self.mean, "m2": self._m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore statistics saved by :meth:`state_dict`."""
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self._m2 = float(state["m2"])
