"""Advantage estimators: GAE against a naive loop, group and leave-one-out baselines by hand."""

from __future__ import annotations

import pytest
import torch

from tether.advantages import gae, group_normalized, leave_one_out, whiten_advantages
from tether.ops import masked_mean, masked_var


def naive_gae(
    rewards: list[float], values: list[float], length: int, gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """GAE for one sequence of ``length`` valid tokens, in plain Python floats.

    The episode ends after the last valid token, so the value after it is 0.
    Returns (advantages, returns) padded with 0 to the full row length.
    """
    T = len(rewards)
    adv = [0.0] * T
    last = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    returns = [adv[t] + values[t] if t < length else 0.0 for t in range(T)]
    return adv, returns


def test_gae_tiny_case_by_hand() -> None:
    # gamma = 0.9, lam = 0.5 (gamma * lam = 0.45); three valid tokens, the 4th is padding with junk.
    # delta_2 = 1 + 0.9 * 0   - 0.7 = 0.3        (V after the last token is 0)
    # delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03
    # delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04
    # A_2 = 0.3; A_1 = 0.03 + 0.45 * 0.3 = 0.165; A_0 = 0.04 + 0.45 * 0.165 = 0.11425
    # returns = A + V: 0.61425, 0.765, 1.0; padding -> 0
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    out = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(out.advantages, torch.tensor([[0.11425, 0.165, 0.3, 0.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.returns, torch.tensor([[0.61425, 0.765, 1.0, 0.0]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.5, 0.3)])
def test_gae_matches_naive_loop(gamma: float, lam: float) -> None:
    g = torch.Generator().manual_seed(7)
    B, T = 9, 7
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    lengths = torch.tensor([7, 0, 1, 3, 6, 2, 7, 5, 4])  # includes an empty and full-length rows
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    out = gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        adv, ret = naive_gae(rewards[b].tolist(), values[b].tolist(), int(lengths[b]), gamma, lam)
        torch.testing.assert_close(out.advantages[b], torch.tensor(adv), rtol=0, atol=1e-5)
        torch.testing.assert_close(out.returns[b], torch.tensor(ret), rtol=0, atol=1e-5)


def test_gae_is_exactly_zero_outside_the_mask_even_with_nan_there() -> None:
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(4, 5, generator=g)
    values = torch.randn(4, 5, generator=g)
    lengths = torch.tensor([5, 2, 0, 4])
    mask = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)
    rewards[~mask] = float("nan")
    values[~mask] = float("nan")
    out = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert torch.isfinite(out.advantages).all() and torch.isfinite(out.returns).all()
    assert (out.advantages[~mask] == 0).all()
    assert (out.returns[~mask] == 0).all()
    # and the valid part still matches the loop (junk past the end does not bootstrap)
    for b in range(4):
        n = int(lengths[b])
        adv, _ = naive_gae(
            rewards[b, :n].tolist() + [0.0] * (5 - n), values[b, :n].tolist() + [0.0] * (5 - n), n, 0.99, 0.95
        )
        torch.testing.assert_close(out.advantages[b], torch.tensor(adv), rtol=0, atol=1e-5)


def test_group_normalized_by_hand() -> None:
    scores = torch.tensor([0.0, 0.0, 0.0, 4.0, 2.0, 2.0, 2.0, 2.0])
    # group 1 (G=4): mean 1, centred -1, -1, -1, 3; unbiased var (1+1+1+9)/3 = 4, std 2
    #   -> -0.5, -0.5, -0.5, 1.5  (a biased std sqrt(3) would give -0.577, ..., 1.732)
    # group 2: all equal -> centred 0, std 0 -> 0 / (0 + eps) = 0
    out = group_normalized(scores, group_size=4)
    torch.testing.assert_close(
        out, torch.tensor([-0.5, -0.5, -0.5, 1.5, 0.0, 0.0, 0.0, 0.0]), rtol=0, atol=1e-5
    )
    # scale=False (Dr. GRPO): only the mean is subtracted
    out = group_normalized(scores, group_size=4, scale=False)
    torch.testing.assert_close(
        out, torch.tensor([-1.0, -1.0, -1.0, 3.0, 0.0, 0.0, 0.0, 0.0]), rtol=0, atol=1e-6
    )
    # G=2 groups of consecutive rows: [0, 0] -> 0, 0; [0, 4] -> mean 2, std sqrt(8) -> -+0.7071
    out = group_normalized(scores[:4], group_size=2)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.70710677, 0.70710677]), rtol=0, atol=1e-5)


def test_leave_one_out_by_hand() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    # group 1, sum 12: s_i - (12 - s_i) / 3
    #   1 - 11/3 = -8/3; 2 - 10/3 = -4/3; 3 - 9/3 = 0; 6 - 6/3 = 4
    # group 2: all equal -> 0
    out = leave_one_out(scores, group_size=4)
    torch.testing.assert_close(
        out, torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]), rtol=0, atol=1e-6
    )
    # G=2: [1, 2] -> -1, 1; [3, 6] -> -3, 3
    torch.testing.assert_close(
        leave_one_out(scores[:4], 2), torch.tensor([-1.0, 1.0, -3.0, 3.0]), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("fn", [group_normalized, leave_one_out])
def test_baselines_reject_bad_group_sizes(fn) -> None:
    scores = torch.arange(6.0)
    for group_size in (1, 4, 0):
        with pytest.raises(ValueError, match="group_size"):
            fn(scores, group_size)


def test_whiten_advantages() -> None:
    g = torch.Generator().manual_seed(5)
    adv = torch.randn(5, 8, generator=g) * 4.0 + 3.0
    lengths = torch.tensor([8, 3, 0, 6, 1])
    mask = torch.arange(8).unsqueeze(0) < lengths.unsqueeze(1)
    adv[~mask] = 100.0  # junk that must not enter the statistics
    out = whiten_advantages(adv, mask)
    assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(out, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert (out[~mask] == 0).all()
    # the whitened values are an affine map of the originals over the batch's masked tokens
    kept = adv[mask].double()
    expected = (kept - kept.mean()) / kept.std()
    torch.testing.assert_close(out[mask].double(), expected, rtol=0, atol=1e-5)
