"""KL estimators, KL-shaped rewards and KL coefficient controllers.

Per-token estimators take the logprob of the sampled token under the policy (``logprobs``) and the
reference (``ref_logprobs``), both [B, T]. With ``r = p_ref / p_policy`` evaluated at a token sampled
from the policy (Schulman, "Approximating KL Divergence", 2020):

- ``k1 = -log r``: unbiased, but a single sample can be negative.
- ``k2 = (log r)^2 / 2``: biased, low variance, >= 0.
- ``k3 = (r - 1) - log r``: unbiased and >= 0 for every sample.
- ``full``: no estimate at all; the exact KL between the two next-token distributions (``kl_full``).

All three are unbiased/low-bias only when the token really was sampled from the policy's own
distribution at the same temperature; see ``tether.sampling`` for the settings that break that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

KLEstimatorName = Literal["k1", "k2", "k3", "full"]


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``log p - log q`` per token: [B, T] -> [B, T]."""
    return logprobs.float() - ref_logprobs.float()


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``(log p - log q)^2 / 2`` per token: [B, T] -> [B, T]."""
    return 0.5 * (logprobs.float() - ref_logprobs.float()) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``(q/p - 1) - log(q/p)`` per token, >= 0 for every sample: [B, T] -> [B, T]."""
    log_ratio = ref_logprobs.float() - logprobs.float()
    # expm1 keeps precision when the two models agree (log_ratio ~ 0), where exp(x) - 1 cancels.
    return torch.expm1(log_ratio) - log_ratio


def kl_full(
    logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 64
) -> torch.Tensor:
    """Exact per-token KL(policy || reference) over the whole vocabulary.

    logits, ref_logits [B, T, V] -> [B, T] float32, ``sum_v p_v (log p_v - log q_v)`` with both
    distributions at the sampling temperature. It is >= 0 by construction, whatever produced the
    tokens, and has no sampling noise. Computed ``chunk_size`` token positions of one sequence at a
    time, so the float32 log-softmaxes of both models exist for one block only, never
    for the whole [B, T, V] (``bench/kl_cost.py`` measures the difference). Differentiable.
    """
    rows = []
    for b in range(logits.shape[0]):  # indexing (not reshape) keeps a strided slice of the logits a view
        blocks = []
        for s in range(0, logits.shape[1], chunk_size):
            logp = torch.log_softmax(logits[b, s : s + chunk_size].float() / temperature, dim=-1)
            logq = torch.log_softmax(ref_logits[b, s : s + chunk_size].float() / temperature, dim=-1)
            blocks.append((logp.exp() * (logp - logq)).sum(-1))
        rows.append(torch.cat(blocks))
    # Documented clamp: float rounding gives ~-1e-9 where the two distributions agree; the true value is >= 0.
    return torch.stack(rows).clamp(min=0.0)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-kl_coef * kl`` plus the sequence score at the last valid response token.

    scores [B], kl [B, T], response_mask [B, T] (True = token counts) -> (rewards [B, T], non_score [B, T]).
    The score goes on the last token the mask keeps (the EOS, or the last token of a response that
    hit the length limit), not one past it (DESIGN.md). Positions outside the mask are exactly 0.
    A row with an empty mask gets no score (it has no token to carry it).
    """
    mask = response_mask.bool()
    non_score = torch.where(mask, -kl_coef * kl.float(), torch.zeros_like(kl, dtype=torch.float32))
    lengths = mask.sum(-1)  # [B]
    last = (lengths - 1).clamp(min=0)
    has_token = (lengths > 0).float()
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.float() * has_token
    return rewards, non_score


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:  # noqa: ARG002 - same interface as adaptive
        return None

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences", 2.2).

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``, where
    ``n_steps`` is the number of episodes seen since the last update.
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(coef: float, target: float | None, horizon: int) -> KLController:
    """Fixed controller when ``target`` is None, else adaptive."""
    if target is None:
        return FixedKLController(coef)
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
    return AdaptiveKLController(coef, target, horizon)
