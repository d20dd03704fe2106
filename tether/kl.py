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
from typing import Literal, NamedTuple

import torch

from tether.ops import last_true_index

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


class KLTerms(NamedTuple):
    """What a per-token KL estimator may read, for B sequences of T response tokens.

    ``logprobs`` and ``ref_logprobs`` [B, T] are the sampled tokens' logprobs under the policy's own
    distribution and the reference's, both at the sampling temperature. ``logits`` and ``ref_logits``
    [B, T, V] are the raw logits that predicted each token; only estimators with ``needs_logits`` read them.
    """

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    logits: torch.Tensor | None = None
    ref_logits: torch.Tensor | None = None
    temperature: float = 1.0


class KLEstimator(NamedTuple):
    """A per-token KL estimator: ``fn(terms) -> [B, T]`` and whether it reads the whole distributions.

    An estimator with ``needs_logits`` is a function of the two next-token distributions alone, not of the
    sampled token, so it needs the reference's logits (not just its logprobs) wherever it is evaluated.
    """

    fn: Callable[[KLTerms], torch.Tensor]
    needs_logits: bool


def _full(terms: KLTerms) -> torch.Tensor:
    if terms.logits is None or terms.ref_logits is None:
        raise ValueError("the full KL needs the policy's and the reference's logits")
    return kl_full(terms.logits, terms.ref_logits, terms.temperature)


#: kl.estimator -> estimator. A new estimator is a function and one entry here.
KL_ESTIMATORS: dict[str, KLEstimator] = {
    "k1": KLEstimator(lambda t: kl_k1(t.logprobs, t.ref_logprobs), needs_logits=False),
    "k2": KLEstimator(lambda t: kl_k2(t.logprobs, t.ref_logprobs), needs_logits=False),
    "k3": KLEstimator(lambda t: kl_k3(t.logprobs, t.ref_logprobs), needs_logits=False),
    "full": KLEstimator(_full, needs_logits=True),
}
#: The estimator that is the exact KL (``kl.log_exact`` logs it beside the configured one).
EXACT_KL = "full"


def _estimator(name: str) -> KLEstimator:
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; expected one of {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name]


def token_kl(estimator: str, terms: KLTerms) -> torch.Tensor:
    """Per-token KL of the named estimator, [B, T] float32: the one entry point every trainer calls."""
    return _estimator(estimator).fn(terms)


def kl_needs_logits(estimator: str) -> bool:
    """Whether ``estimator`` reads the reference's logits (so a forward must keep them, not only logprobs)."""
    return _estimator(estimator).needs_logits


def kl_needs_loss_term(placement: str, estimator: str) -> bool:
    """Whether the KL must appear as a loss term for the gradient of the KL-regularised objective.

    Always when it is placed in the loss. Also for an estimator that reads the whole distributions placed in
    the reward: a per-token reward ``-beta * KL(pi(.|s_t) || ref(.|s_t))`` does not depend on the sampled
    token, so the policy gradient only sees its effect on later states; the direct gradient of the KL at
    ``s_t`` has to be added as a loss term (with the same coefficient).
    """
    return placement == "loss" or kl_needs_logits(estimator)


def kl_shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-kl_coef * kl`` plus the sequence score at the last valid response token.

    scores [B], kl [B, T], response_mask [B, T] (True = token counts) -> (rewards [B, T], non_score [B, T]).
    The score goes on the last token the mask keeps (the EOS, or the last token of a response that
    hit the length limit), not one past it (DESIGN.md): the last True of each row, wherever it lies, so a
    left-padded mask or one with holes is placed correctly too. Positions outside the mask are exactly 0.
    A row with an empty mask gets no score (it has no token to carry it).
    """
    mask = response_mask.bool()
    non_score = torch.where(mask, -kl_coef * kl.float(), torch.zeros_like(kl, dtype=torch.float32))
    last = last_true_index(mask)  # [B], -1 where the row is empty
    has_token = last >= 0
    last = last.clamp(min=0)
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    # where(), not a product: a NaN score of an empty row must not land outside the mask
    rewards[rows, last] += torch.where(has_token, scores.float(), torch.zeros_like(scores, dtype=torch.float32))
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
