"""Policy and value losses, and loss aggregation.

Shapes: B batch, T response length. Loss functions take the new logprobs first and return a
per-token loss plus their statistics, so the trainer aggregates once and logs once (DESIGN.md 6).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from tether.ops import masked_mean

LossAggregation = Literal["token-mean", "seq-mean"]


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # [B, T] per-token clipped surrogate loss (to be aggregated)
    clipped: torch.Tensor  # [B, T] bool, True where the clipped branch was taken
    approx_kl: torch.Tensor  # [B, T] per-token k3 estimate of KL(old || new) of these logprobs, for monitoring
    ratio: torch.Tensor  # [B, T]


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
) -> PolicyLossOutput:
    """Clipped surrogate of PPO (Schulman et al. 2017), with separate low/high clip (DAPO's clip-higher).

    ``L = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))`` with ``r = exp(logprobs - old_logprobs)``;
    ``clip_high`` defaults to ``clip_low``. All inputs [B, T]; the per-token loss is 0 outside the mask.
    """
    clip_high = clip_low if clip_high is None else clip_high
    mask = response_mask.bool()
    # Masked positions are set to 0 *before* exp: padding can carry -inf - -inf = NaN logprob differences
    # (warped sampling), and a NaN there would poison the gradient even behind a later torch.where.
    log_ratio = torch.where(mask, logprobs.float() - old_logprobs.float(), torch.zeros_like(logprobs, dtype=torch.float32))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    zeros = torch.zeros_like(loss)
    took_clip = (clipped > unclipped) & mask
    return PolicyLossOutput(
        torch.where(mask, loss, zeros), took_clip, approx_kl(logprobs, old_logprobs, mask), ratio.detach()
    )


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(old || new) on tokens sampled from the old policy, for monitoring.

    ``(r - 1) - log r`` with ``r = p_new / p_old``: >= 0 per token, 0 outside the mask, no gradient
    (TRL logs a k2 variant as policy/approx_kl). [B, T] -> [B, T].
    """
    mask = response_mask.bool()
    log_ratio = torch.where(mask, (logprobs - old_logprobs).detach().float(), torch.zeros_like(logprobs, dtype=torch.float32))
    return torch.expm1(log_ratio) - log_ratio


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor  # [B, T] per-token loss (0.5 * squared error, clipped branch when larger)
    clipped: torch.Tensor  # [B, T] bool


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> ValueLossOutput:
    """Clipped value loss as in PPO2/TRL: ``0.5 * max((V - R)^2, (clip(V, V_old ± eps) - R)^2)``.

    ``clip_range=None`` gives the plain ``0.5 * (V - R)^2``. All inputs [B, T].
    """
    mask = response_mask.bool()
    unclipped = (values - returns) ** 2
    if clip_range is None:
        loss, took_clip = unclipped, torch.zeros_like(mask)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (v_clipped - returns) ** 2
        loss = torch.maximum(unclipped, clipped)
        took_clip = (clipped > unclipped) & mask
    return ValueLossOutput(torch.where(mask, 0.5 * loss, torch.zeros_like(loss)), took_clip)


def loss_normalizer(response_mask: torch.Tensor, mode: LossAggregation) -> float:
    """The denominator that makes a mini-batch's loss independent of how it is split into micro-batches.

    Computed once over the whole mini-batch: its number of valid tokens (token-mean) or sequences (seq-mean).
    """
    if mode == "token-mean":
        return float(response_mask.sum().item())
    if mode == "seq-mean":
        return float(response_mask.shape[0])
    raise ValueError(f"unknown loss aggregation {mode!r}; expected 'token-mean' or 'seq-mean'")


def aggregate(
    loss: torch.Tensor, response_mask: torch.Tensor, mode: LossAggregation, normalizer: float | None = None
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    - ``token-mean``: sum over valid tokens / ``normalizer`` (default: this batch's valid-token count).
    - ``seq-mean``: each sequence's mean over its tokens, summed / ``normalizer`` (default: B).

    Pass ``normalizer=loss_normalizer(minibatch_mask, mode)`` when accumulating micro-batches, so that
    the sum of micro-batch losses equals the loss of the whole mini-batch.
    """
    mask = response_mask.bool()
    if normalizer is None:
        normalizer = loss_normalizer(response_mask, mode)
    normalizer = max(normalizer, 1.0)
    if mode == "token-mean":
        return torch.where(mask, loss, torch.zeros_like(loss)).sum() / normalizer
    if mode == "seq-mean":
        return masked_mean(loss, mask, dim=-1).sum() / normalizer
    raise ValueError(f"unknown loss aggregation {mode!r}; expected 'token-mean' or 'seq-mean'")
