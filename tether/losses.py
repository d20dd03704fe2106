"""Policy and value losses, and loss aggregation.

Shapes: B batch, T response length. Loss functions take the new logprobs first and return a
per-token loss plus their statistics, so the trainer aggregates once and logs once (DESIGN.md 6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from tether.ops import masked_mean

LossAggregation = Literal["token-mean", "seq-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum-norm"]


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # [B, T] per-token loss (to be aggregated), 0 outside the mask
    clipped_low: torch.Tensor  # [B, T] bool: the ratio fell below 1 - clip_low with A < 0 (its branch was taken)
    clipped_high: torch.Tensor  # [B, T] bool: the ratio rose above 1 + clip_high with A > 0
    approx_kl: torch.Tensor  # [B, T] per-token k3 estimate of KL(old || new) of these logprobs, for monitoring
    ratio: torch.Tensor  # [B, T] the importance ratio the loss used (detached)

    @property
    def clipped(self) -> torch.Tensor:
        """[B, T] bool: the clipped branch was taken, on either side."""
        return self.clipped_low | self.clipped_high


@dataclass(frozen=True)
class PolicyLossSettings:
    """Hyper-parameters of the policy losses; each loss reads the ones it documents."""

    clip_low: float = 0.2
    """Ratio clip below 1 (eps_low)."""
    clip_high: float | None = None
    """Ratio clip above 1 (eps_high, DAPO's clip-higher); None = clip_low."""
    dual_clip: float = 3.0
    """dual-clip's bound c > 1 on the loss of a negative-advantage token (Ye et al. 2020)."""


def _clipped_surrogate(
    ratio: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: PolicyLossSettings,
) -> PolicyLossOutput:
    """``max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))`` per token, the branch taken, 0 outside the mask,
    with the monitoring KL of the token logprobs (whatever ratio the loss uses)."""
    clip_high = settings.clip_low if settings.clip_high is None else settings.clip_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - settings.clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    took_clip = (clipped > unclipped) & mask
    return PolicyLossOutput(
        torch.where(mask, loss, torch.zeros_like(loss)),
        took_clip & (advantages < 0),
        took_clip & (advantages > 0),
        approx_kl(logprobs, old_logprobs, mask),
        ratio.detach(),
    )


def _token_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Masked positions are set to 0 *before* exp: padding can carry -inf - -inf = NaN logprob differences
    # (warped sampling), and a NaN there would poison the gradient even behind a later torch.where.
    return torch.where(mask, logprobs.float() - old_logprobs.float(), torch.zeros_like(logprobs, dtype=torch.float32))


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
    mask = response_mask.bool()
    ratio = torch.exp(_token_log_ratio(logprobs, old_logprobs, mask))
    return _clipped_surrogate(
        ratio, logprobs, old_logprobs, advantages, mask, PolicyLossSettings(clip_low, clip_high)
    )


def dual_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    settings: PolicyLossSettings,
) -> PolicyLossOutput:
    """Dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5).

    For ``A < 0`` the clipped surrogate grows without bound with the ratio; dual-clip caps it:
    ``L = min(max(-A r, -A clip(r)), -c A)`` for ``A < 0`` (c = ``settings.dual_clip`` > 1), the PPO loss for
    ``A >= 0``. A token held at the cap gets no gradient. [B, T] in, per-token loss out.
    """
    if settings.dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {settings.dual_clip}")
    mask = response_mask.bool()
    ratio = torch.exp(_token_log_ratio(logprobs, old_logprobs, mask))
    out = _clipped_surrogate(ratio, logprobs, old_logprobs, advantages, mask, settings)
    capped = torch.minimum(out.loss, -settings.dual_clip * advantages)
    return out._replace(loss=torch.where(mask & (advantages < 0), capped, out.loss))


def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    settings: PolicyLossSettings,
) -> PolicyLossOutput:
    """GSPO (Zheng et al. 2025): the clipped surrogate on a sequence-level ratio.

    ``s_i = exp(mean_t (log p_t - log p_old_t))`` over the valid tokens of row i, the geometric mean of the
    token ratios. Written in the paper's GSPO-token form, ``s_{i,t} = sg[s_i] * p_t / sg[p_t]``: every token
    of a row carries the value ``s_i`` and the gradient ``s_i * grad log p_t``, so with advantages equal on
    every token of a row and ``seq-mean-token-mean`` aggregation the loss and its gradient are exactly
    GSPO's. Clip ranges are those of the sequence ratio (the paper uses ~3e-4 / 4e-4). [B, T] in.
    """
    mask = response_mask.bool()
    log_ratio = _token_log_ratio(logprobs, old_logprobs, mask)  # [B, T]
    seq_log_ratio = masked_mean(log_ratio, mask, dim=-1)  # [B]
    token_log_ratio = seq_log_ratio.detach().unsqueeze(-1) + logprobs.float() - logprobs.float().detach()
    ratio = torch.exp(torch.where(mask, token_log_ratio, torch.zeros_like(token_log_ratio)))
    return _clipped_surrogate(ratio, logprobs, old_logprobs, advantages, mask, settings)


def _ppo_clip(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    settings: PolicyLossSettings,
) -> PolicyLossOutput:
    return ppo_clip_loss(logprobs, old_logprobs, advantages, response_mask, settings.clip_low, settings.clip_high)


PolicyLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PolicyLossSettings], PolicyLossOutput]

#: policy_loss name -> loss ``(logprobs, old_logprobs, advantages, response_mask, settings)``.
#: A new objective is a function, one entry here and a test.
POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo-clip": _ppo_clip,
    "dual-clip": dual_clip_loss,
    "gspo": gspo_loss,
}


def policy_loss(
    name: str,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    settings: PolicyLossSettings,
) -> PolicyLossOutput:
    """Look ``name`` up in :data:`POLICY_LOSSES` and run it."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; expected one of {', '.join(POLICY_LOSSES)}")
    return POLICY_LOSSES[name](logprobs, old_logprobs, advantages, response_mask, settings)


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


class Aggregation(NamedTuple):
    """A loss aggregation mode: ``numerator(loss, mask) / normalizer(minibatch_mask, constant)``.

    The numerator is a sum over rows, so a mini-batch split into micro-batches adds up to the same total; the
    normalizer is computed once over the whole mini-batch. Together they make the loss independent of
    micro-batching (DESIGN.md 9).
    """

    numerator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (loss [b, T], mask [b, T]) -> scalar
    normalizer: Callable[[torch.Tensor, float | None], float]  # (mini-batch mask [B, T], constant) -> float


def _token_sum(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, loss, torch.zeros_like(loss)).sum()


def _seq_token_means(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(loss, mask, dim=-1).sum()


def _n_tokens(mask: torch.Tensor, constant: float | None) -> float:  # noqa: ARG001
    return float(mask.sum().item())


def _n_sequences(mask: torch.Tensor, constant: float | None) -> float:  # noqa: ARG001
    return float(mask.shape[0])


def _n_sequences_times_constant(mask: torch.Tensor, constant: float | None) -> float:
    if constant is None or constant <= 0:
        raise ValueError("token-sum-norm needs a positive constant (the maximum response length, as in Dr. GRPO)")
    return float(mask.shape[0]) * constant


#: loss_aggregation name -> mode. All losses of a trainer (policy, value, KL) are aggregated the same way.
LOSS_AGGREGATIONS: dict[str, Aggregation] = {
    # every valid token of the mini-batch weighs the same (DAPO's token-level loss; TRL's default)
    "token-mean": Aggregation(_token_sum, _n_tokens),
    # each sequence's token mean, averaged over sequences (the original GRPO); "seq-mean" is its short name
    "seq-mean-token-mean": Aggregation(_seq_token_means, _n_sequences),
    "seq-mean": Aggregation(_seq_token_means, _n_sequences),
    # each sequence's token sum, averaged over sequences
    "seq-mean-token-sum": Aggregation(_token_sum, _n_sequences),
    # the sum over all tokens divided by B x a constant (Dr. GRPO, Liu et al. 2025: no length bias)
    "token-sum-norm": Aggregation(_token_sum, _n_sequences_times_constant),
}


def _aggregation(mode: str) -> Aggregation:
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(map(repr, LOSS_AGGREGATIONS))}")
    return LOSS_AGGREGATIONS[mode]


def loss_normalizer(response_mask: torch.Tensor, mode: LossAggregation, constant: float | None = None) -> float:
    """The denominator that makes a mini-batch's loss independent of how it is split into micro-batches.

    Computed once over the whole mini-batch: its number of valid tokens (token-mean), of sequences
    (seq-mean-token-mean, seq-mean-token-sum) or of sequences times ``constant`` (token-sum-norm).
    """
    return _aggregation(mode).normalizer(response_mask.bool(), constant)


def aggregate(
    loss: torch.Tensor,
    response_mask: torch.Tensor,
    mode: LossAggregation,
    normalizer: float | None = None,
    constant: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar: the mode's numerator over this batch / ``normalizer``.

    ``normalizer`` defaults to this batch's own (:func:`loss_normalizer`). Pass the whole mini-batch's
    normalizer when accumulating micro-batches, so that the sum of micro-batch losses equals the loss of the
    whole mini-batch.
    """
    mask = response_mask.bool()
    agg = _aggregation(mode)
    if normalizer is None:
        normalizer = agg.normalizer(mask, constant)
    return agg.numerator(loss, mask) / max(normalizer, 1.0)
