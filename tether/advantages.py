"""Advantage estimators.

Shapes: B batch, G group size (completions per prompt), T response length.
Advantages are exactly zero where ``response_mask`` is False.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tether.ops import masked_whiten


class AdvantageResult(NamedTuple):
    advantages: torch.Tensor  # [B, T]
    returns: torch.Tensor  # [B, T] value targets


def gae(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> AdvantageResult:
    """Generalised Advantage Estimation (Schulman et al. 2016), masked.

    rewards, values, response_mask: [B, T]. The mask must be a prefix of each row (a response up to
    and including its EOS). Past the last valid token the episode has ended, so its bootstrap value
    is 0: ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V_{t+1} = 0`` at the last valid token.
    Returns ``advantages`` and ``returns = advantages + values`` (the value targets), zero outside the mask.
    """
    mask = response_mask.bool()
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
    unbiased sample std of each group; ``scale=False`` only subtracts the mean (Dr. GRPO).
    """
    if group_size < 2 or scores.numel() % group_size != 0:
        raise ValueError(f"group_size must be >= 2 and divide the batch ({scores.numel()}), got {group_size}")
    grouped = scores.float().view(-1, group_size)  # [B/G, G]
    centred = grouped - grouped.mean(-1, keepdim=True)
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
