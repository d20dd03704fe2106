"""Advantage estimators, behind one signature in a registry (``ADVANTAGE_ESTIMATORS``).

Shapes: B batch, G group size (completions per prompt, consecutive rows share a prompt), T response length.
Advantages are exactly zero where ``response_mask`` is False.

Every estimator reads the per-token rewards ``rewards`` [B, T] built by :func:`tether.kl.kl_shaped_rewards`:
the sequence score on the last valid token, plus ``-beta * KL`` on every token when the KL is placed in the
reward. A sequence-level estimator (GRPO, RLOO) uses each row's total ``rewards.sum(-1)``, which is the score
alone when the KL is not in the reward, and spreads the result over the response tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from tether.ops import is_prefix_mask, masked_whiten


class AdvantageResult(NamedTuple):
    advantages: torch.Tensor  # [B, T]
    returns: torch.Tensor | None  # [B, T] value targets; None for estimators without a value model


class AdvantageInputs(NamedTuple):
    """What an advantage estimator may read."""

    rewards: torch.Tensor  # [B, T] per-token rewards (score on the last valid token, -beta * KL when in the reward)
    response_mask: torch.Tensor  # [B, T] bool, True on the response tokens that count
    values: torch.Tensor | None = None  # [B, T] value of the state before each token (GAE only)
    group_size: int = 1  # G: consecutive rows that answer the same prompt


ScaleRewards = Literal["group", "batch", "none"]


@dataclass(frozen=True)
class AdvantageSettings:
    """The estimators' hyper-parameters; each estimator reads the ones it documents."""

    gamma: float = 1.0
    """Discount (gae, reinforce++)."""
    lam: float = 0.95
    """GAE lambda (gae)."""
    scale_rewards: ScaleRewards = "group"
    """grpo: divide by the group's std ("group", GRPO), the whole batch's std ("batch") or nothing ("none",
    Dr. GRPO: the std division favours prompts that are too easy or too hard, Liu et al. 2025)."""
    eps: float = 1e-6
    """Added to a standard deviation before dividing by it (a group with equal scores then gets 0, not NaN)."""


def gae(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> AdvantageResult:
    """Generalised Advantage Estimation (Schulman et al. 2016), masked.

    rewards, values, response_mask: [B, T]. The mask must be a prefix of each row (a response up to
    and including its EOS). Past the last valid token the episode has ended, so its bootstrap value
    is 0: ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V_{t+1} = 0`` at the last valid token.
    Returns ``advantages`` and ``returns = advantages + values`` (the value targets), zero outside the mask.
    A mask with holes or left padding is refused: the recursion would treat its pieces as separate episodes.
    """
    mask = response_mask.bool()
    check_prefix_mask(mask, "gae")
    zeros = torch.zeros_like(rewards, dtype=torch.float32)
    r = torch.where(mask, rewards.float(), zeros)
    v = torch.where(mask, values.float(), zeros)
    T = r.shape[1]
    next_values = torch.cat([v[:, 1:], zeros[:, :1]], dim=1)  # [B, T]
    deltas = r + gamma * next_values - v
    advantages = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    # Backward recursion A_t = delta_t + gamma * lam * A_{t+1}; masked positions carry 0 forward.
    for t in reversed(range(T)):
        running = deltas[:, t] + gamma * lam * running
        running = torch.where(mask[:, t], running, torch.zeros_like(running))
        advantages[:, t] = running
    returns = torch.where(mask, advantages + v, zeros)
    return AdvantageResult(advantages, returns)


def whiten_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-variance advantages over the masked tokens of the whole batch."""
    return masked_whiten(advantages, response_mask, shift_mean=True)


def group_normalized(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO baseline (Shao et al. 2024): ``(s - mean_group) / (std_group + eps)``.

    scores [B] with B = n_prompts * G, consecutive rows sharing a prompt -> [B]. The std is the
    unbiased sample std of each group; ``scale=False`` only subtracts the mean (Dr. GRPO). A group of equal
    scores gets exactly 0.
    """
    if group_size < 2 or scores.numel() % group_size != 0:
        raise ValueError(f"group_size must be >= 2 and divide the batch ({scores.numel()}), got {group_size}")
    grouped = scores.float().view(-1, group_size)  # [B/G, G]
    centred = grouped - grouped.mean(-1, keepdim=True)
    # A group whose scores are all equal carries no signal: exactly 0. Computed, its float32 mean can round
    # (three scores of 0.9 centre to +6e-8 each, with a std of 7e-8), and dividing by that std gives 0.8.
    constant = grouped.amax(-1, keepdim=True) == grouped.amin(-1, keepdim=True)
    centred = torch.where(constant, torch.zeros_like(centred), centred)
    if scale:
        centred = centred / (grouped.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO baseline (Ahmadian et al. 2024): ``s_i - mean_{j != i} s_j`` within each group. [B] -> [B]."""
    if group_size < 2 or scores.numel() % group_size != 0:
        raise ValueError(f"group_size must be >= 2 and divide the batch ({scores.numel()}), got {group_size}")
    grouped = scores.float().view(-1, group_size)
    others_mean = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(-1)


def check_prefix_mask(mask: torch.Tensor, what: str) -> None:
    """Refuse a response mask that is not a prefix of every row (True up to the EOS, False after it)."""
    bad = (~is_prefix_mask(mask)).nonzero()
    if len(bad):
        row = int(bad[0, 0])
        raise ValueError(
            f"{what} needs a response mask that is True on a prefix of each row (the response up to its EOS); "
            f"row {row} is {mask[row].int().tolist()}"
        )


def spread_over_tokens(sequence_values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """A per-sequence value [B] repeated on every response token of its row, 0 outside the mask: [B, T]."""
    mask = response_mask.bool()
    return torch.where(mask, sequence_values.float().unsqueeze(-1), torch.zeros(mask.shape, device=mask.device))


def sequence_rewards(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Each row's total reward over its response tokens: [B, T] -> [B]."""
    return torch.where(response_mask.bool(), rewards.float(), torch.zeros_like(rewards, dtype=torch.float32)).sum(-1)


def discounted_returns(rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}`` within each response, 0 outside the mask: [B, T] -> [B, T]."""
    mask = response_mask.bool()
    check_prefix_mask(mask, "discounted_returns")
    r = torch.where(mask, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return torch.where(mask, out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------------
# The registry: every estimator is fn(AdvantageInputs, AdvantageSettings) -> AdvantageResult.


def gae_estimator(inputs: AdvantageInputs, settings: AdvantageSettings) -> AdvantageResult:
    """GAE over the per-token rewards and a value model's values (PPO)."""
    if inputs.values is None:
        raise ValueError("the 'gae' advantage estimator needs values (a value model)")
    return gae(inputs.rewards, inputs.values, inputs.response_mask, settings.gamma, settings.lam)


def grpo_estimator(inputs: AdvantageInputs, settings: AdvantageSettings) -> AdvantageResult:
    """GRPO (Shao et al. 2024): each sequence's reward minus its group's mean, divided by a std, on every token.

    ``scale_rewards``: "group" divides by the group's (unbiased) std, "batch" by the std of all B rewards (a
    zero-std group still gets 0), "none" does not divide (Dr. GRPO).
    """
    seq = sequence_rewards(inputs.rewards, inputs.response_mask)  # [B]
    G = inputs.group_size
    if settings.scale_rewards == "batch":
        centred = group_normalized(seq, G, scale=False)
        advantages = centred / (seq.std() + settings.eps) if seq.numel() > 1 else centred
    elif settings.scale_rewards in ("group", "none"):
        advantages = group_normalized(seq, G, scale=settings.scale_rewards == "group", eps=settings.eps)
    else:
        raise ValueError(f"unknown scale_rewards {settings.scale_rewards!r}; expected 'group', 'batch' or 'none'")
    return AdvantageResult(spread_over_tokens(advantages, inputs.response_mask), None)


def rloo_estimator(inputs: AdvantageInputs, settings: AdvantageSettings) -> AdvantageResult:  # noqa: ARG001
    """RLOO (Ahmadian et al. 2024): each sequence's reward minus the mean of the other G - 1, on every token."""
    seq = sequence_rewards(inputs.rewards, inputs.response_mask)
    return AdvantageResult(spread_over_tokens(leave_one_out(seq, inputs.group_size), inputs.response_mask), None)


def reinforce_pp_estimator(inputs: AdvantageInputs, settings: AdvantageSettings) -> AdvantageResult:
    """REINFORCE++ (Hu 2025): discounted reward-to-go of the per-token rewards (KL in the reward), whitened
    over every response token of the batch. Needs no groups and no value model."""
    returns = discounted_returns(inputs.rewards, inputs.response_mask, settings.gamma)
    return AdvantageResult(masked_whiten(returns, inputs.response_mask, shift_mean=True), None)


AdvantageEstimator = Callable[[AdvantageInputs, AdvantageSettings], AdvantageResult]

#: advantage name -> estimator. A new estimator is a function, one entry here and a test.
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": gae_estimator,
    "grpo": grpo_estimator,
    "rloo": rloo_estimator,
    "reinforce++": reinforce_pp_estimator,
}
#: Estimators whose baseline is the group of G completions of one prompt (they need G >= 2).
GROUP_ESTIMATORS = frozenset({"grpo", "rloo"})


def compute_advantages(name: str, inputs: AdvantageInputs, settings: AdvantageSettings) -> AdvantageResult:
    """Look ``name`` up in :data:`ADVANTAGE_ESTIMATORS` and run it."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; expected one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name](inputs, settings)
