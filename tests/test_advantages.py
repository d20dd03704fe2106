"""Advantage estimators: GAE against a naive loop, group and leave-one-out baselines by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tether.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    AdvantageSettings,
    compute_advantages,
    discounted_returns,
    gae,
    group_normalized,
    leave_one_out,
    whiten_advantages,
)
from tether.kl import kl_shaped_rewards
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


# A tiny batch for the sequence estimators: B=6, two groups of G=3, T=3, ragged prefix masks.
# Each row's score sits on its last valid token; junk (100) outside the mask must not count.
HAND_LENGTHS = [2, 3, 1, 3, 2, 1]
HAND_SCORES = [0.0, 3.0, 6.0, 1.0, 2.0, 3.0]


def _hand_inputs() -> AdvantageInputs:
    mask = torch.arange(3).unsqueeze(0) < torch.tensor(HAND_LENGTHS).unsqueeze(1)
    rewards = torch.where(mask, torch.zeros(6, 3), torch.full((6, 3), 100.0))
    for b, (n, s) in enumerate(zip(HAND_LENGTHS, HAND_SCORES, strict=True)):
        rewards[b, n - 1] = s
    return AdvantageInputs(rewards, mask, group_size=3)


def _on_tokens(per_row: list[float], mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, torch.tensor(per_row).unsqueeze(-1), torch.zeros(mask.shape))


def test_grpo_scale_group_by_hand() -> None:
    # group 1: 0, 3, 6 -> mean 3, centred -3, 0, 3; unbiased var (9 + 0 + 9) / 2 = 9, std 3 -> -1, 0, 1
    #   (a biased std sqrt(6) would give -+1.2247)
    # group 2: 1, 2, 3 -> mean 2, centred -1, 0, 1; unbiased var (1 + 0 + 1) / 2 = 1, std 1 -> -1, 0, 1
    # the std has eps = 0.5 added: -3 / 3.5, 0, 3 / 3.5; -1 / 1.5, 0, 1 / 1.5
    inputs = _hand_inputs()
    out = compute_advantages("grpo", inputs, AdvantageSettings(scale_rewards="group", eps=0.5))
    expected = [-3 / 3.5, 0.0, 3 / 3.5, -1 / 1.5, 0.0, 1 / 1.5]
    torch.testing.assert_close(out.advantages, _on_tokens(expected, inputs.response_mask), rtol=0, atol=1e-6)
    assert out.returns is None


def test_grpo_scale_batch_by_hand() -> None:
    # centred within groups: -3, 0, 3, -1, 0, 1 (as above), then divided by the std of all six rewards:
    # 0, 3, 6, 1, 2, 3 -> mean 2.5; deviations -2.5, 0.5, 3.5, -1.5, -0.5, 0.5; squares sum to
    # 6.25 + 0.25 + 12.25 + 2.25 + 0.25 + 0.25 = 21.5; unbiased var 21.5 / 5 = 4.3
    inputs = _hand_inputs()
    out = compute_advantages("grpo", inputs, AdvantageSettings(scale_rewards="batch", eps=1e-6))
    std = math.sqrt(4.3) + 1e-6
    expected = [-3 / std, 0.0, 3 / std, -1 / std, 0.0, 1 / std]
    torch.testing.assert_close(out.advantages, _on_tokens(expected, inputs.response_mask), rtol=0, atol=1e-6)


def test_grpo_scale_none_is_dr_grpo_by_hand() -> None:
    # Dr. GRPO: the group mean is subtracted and nothing is divided: -3, 0, 3, -1, 0, 1
    inputs = _hand_inputs()
    out = compute_advantages("grpo", inputs, AdvantageSettings(scale_rewards="none"))
    expected = [-3.0, 0.0, 3.0, -1.0, 0.0, 1.0]
    torch.testing.assert_close(out.advantages, _on_tokens(expected, inputs.response_mask), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [1e-6, 1e-12])
def test_grpo_zero_std_group_gets_exactly_zero(scale: str, eps: float) -> None:
    # the second group scores 2, 2, 2: centred 0, std 0 -> 0 / (0 + eps) = 0, with no NaN even for a tiny eps
    inputs = _hand_inputs()
    rewards = inputs.rewards.clone()
    rewards[3, 2], rewards[4, 1], rewards[5, 0] = 2.0, 2.0, 2.0
    out = compute_advantages(
        "grpo", inputs._replace(rewards=rewards), AdvantageSettings(scale_rewards=scale, eps=eps)
    )
    assert torch.isfinite(out.advantages).all()
    assert (out.advantages[3:] == 0).all()
    # group 1 (0, 3, 6) still gets its -a on row 0's two tokens and +a on row 2's one token
    assert (out.advantages[0, :2] < 0).all() and out.advantages[2, 0] > 0


@pytest.mark.parametrize("eps", [1e-6, 1e-12])
def test_grpo_equal_scores_that_round_get_exactly_zero(eps: float) -> None:
    # three completions all scored 0.9: every one is exactly as good as its group, so the advantage is 0
    # (computed, the float32 group mean rounds: each centres to +6e-8 with a std of 7e-8)
    mask = torch.ones(3, 2, dtype=torch.bool)
    rewards = torch.tensor([[0.0, 0.9], [0.0, 0.9], [0.0, 0.9]])
    out = compute_advantages("grpo", AdvantageInputs(rewards, mask, group_size=3), AdvantageSettings(eps=eps))
    assert (out.advantages == 0).all(), out.advantages


def test_rloo_by_hand() -> None:
    # s_i - mean of the other two: group 1 (0, 3, 6): 0 - 4.5, 3 - 3, 6 - 1.5 = -4.5, 0, 4.5
    # group 2 (1, 2, 3): 1 - 2.5, 2 - 2, 3 - 1.5 = -1.5, 0, 1.5
    inputs = _hand_inputs()
    out = compute_advantages("rloo", inputs, AdvantageSettings())
    expected = [-4.5, 0.0, 4.5, -1.5, 0.0, 1.5]
    torch.testing.assert_close(out.advantages, _on_tokens(expected, inputs.response_mask), rtol=0, atol=1e-6)
    assert out.returns is None


def naive_reinforce_pp(rewards: list[list[float]], lengths: list[int], gamma: float) -> list[list[float]]:
    """Reward-to-go within each response, then (x - mean) / unbiased std over every valid token of the batch."""
    returns = []
    for row, n in zip(rewards, lengths, strict=True):
        g, out = 0.0, [0.0] * len(row)
        for t in reversed(range(n)):
            g = row[t] + gamma * g
            out[t] = g
        returns.append(out)
    kept = [r[t] for r, n in zip(returns, lengths, strict=True) for t in range(n)]
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((x - mean) ** 2 for x in kept) / (len(kept) - 1))
    return [
        [(r[t] - mean) / std if t < n else 0.0 for t in range(len(r))]
        for r, n in zip(returns, lengths, strict=True)
    ]


def test_reinforce_pp_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(4)
    lengths = [4, 1, 0, 3, 2]
    mask = torch.arange(4).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    rewards = torch.where(mask, torch.randn(5, 4, generator=g), torch.full((5, 4), 50.0))
    out = compute_advantages("reinforce++", AdvantageInputs(rewards, mask), AdvantageSettings(gamma=0.9))
    expected = naive_reinforce_pp(torch.where(mask, rewards, 0.0).tolist(), lengths, gamma=0.9)
    torch.testing.assert_close(out.advantages, torch.tensor(expected), rtol=0, atol=1e-5)
    assert masked_mean(out.advantages, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(out.advantages, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert out.returns is None


def test_discounted_returns_by_hand() -> None:
    # gamma = 0.9, rewards 1, 0, 2 (t=3 masked, junk 7): G_2 = 2, G_1 = 0 + 0.9 * 2 = 1.8, G_0 = 1 + 0.9 * 1.8 = 2.62
    out = discounted_returns(
        torch.tensor([[1.0, 0.0, 2.0, 7.0]]), torch.tensor([[True, True, True, False]]), 0.9
    )
    torch.testing.assert_close(out, torch.tensor([[2.62, 1.8, 2.0, 0.0]]), rtol=0, atol=1e-6)


def test_gae_through_the_registry_equals_gae() -> None:
    g = torch.Generator().manual_seed(9)
    rewards, values = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    mask = torch.arange(5).unsqueeze(0) < torch.tensor([5, 2, 0, 3]).unsqueeze(1)
    out = compute_advantages(
        "gae", AdvantageInputs(rewards, mask, values), AdvantageSettings(gamma=0.9, lam=0.7)
    )
    direct = gae(rewards, values, mask, gamma=0.9, lam=0.7)
    torch.testing.assert_close(out.advantages, direct.advantages, rtol=0, atol=0)
    torch.testing.assert_close(out.returns, direct.returns, rtol=0, atol=0)
    # the settings reach gae: other gamma / lam give other advantages
    assert not torch.equal(out.advantages, gae(rewards, values, mask, gamma=1.0, lam=0.95).advantages)


def test_gae_registry_without_values_raises() -> None:
    with pytest.raises(ValueError, match="needs values"):
        compute_advantages("gae", _hand_inputs(), AdvantageSettings())


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_sequence_estimators_use_the_total_reward_with_kl(name: str) -> None:
    # both rows score 1 -> with the KL out of the reward the two are equal and get 0.
    # KL in the reward, beta = 0.1: row 0 has 2 tokens of KL 0.5 -> total 1 - 0.1 * 1.0 = 0.9;
    # row 1 has 3 tokens of KL 1 -> total 1 - 0.1 * 3.0 = 0.7.
    # grpo (scale none): mean 0.8 -> +0.1, -0.1; rloo: 0.9 - 0.7 = +0.2, -0.2
    mask = torch.tensor([[True, True, False], [True, True, True]])
    kl = torch.tensor([[0.5, 0.5, 9.0], [1.0, 1.0, 1.0]])
    settings = AdvantageSettings(scale_rewards="none")
    plain, _ = kl_shaped_rewards(torch.tensor([1.0, 1.0]), kl, mask, kl_coef=0.0)
    shaped, _ = kl_shaped_rewards(torch.tensor([1.0, 1.0]), kl, mask, kl_coef=0.1)
    without = compute_advantages(name, AdvantageInputs(plain, mask, group_size=2), settings).advantages
    with_kl = compute_advantages(name, AdvantageInputs(shaped, mask, group_size=2), settings).advantages
    assert (without == 0).all()
    delta = 0.1 if name == "grpo" else 0.2
    torch.testing.assert_close(with_kl, _on_tokens([delta, -delta], mask), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_every_estimator_is_exactly_zero_outside_the_mask(name: str) -> None:
    g = torch.Generator().manual_seed(2)
    mask = torch.arange(4).unsqueeze(0) < torch.tensor([4, 2, 0, 3]).unsqueeze(1)
    rewards = torch.where(mask, torch.randn(4, 4, generator=g), torch.full((4, 4), float("nan")))
    values = torch.where(mask, torch.randn(4, 4, generator=g), torch.full((4, 4), float("nan")))
    out = compute_advantages(name, AdvantageInputs(rewards, mask, values, group_size=2), AdvantageSettings())
    assert torch.isfinite(out.advantages).all()
    assert (out.advantages[~mask] == 0).all()
    assert (out.advantages[mask] != 0).all()


def test_advantage_registry_holds_exactly_the_known_estimators() -> None:
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo", "reinforce++"}


HOLED = torch.tensor([[True, True, False], [True, False, True], [True, True, True]])
LEFT_PADDED = torch.tensor([[True, True, False], [True, True, True], [False, True, True]])


@pytest.mark.parametrize(
    "mask,bad_row", [(HOLED, r"row 1 is \[1, 0, 1\]"), (LEFT_PADDED, r"row 2 is \[0, 1, 1\]")]
)
def test_gae_and_discounted_returns_refuse_a_non_prefix_mask(mask: torch.Tensor, bad_row: str) -> None:
    # the error names the offending row and shows its mask
    rewards, values = torch.ones(3, 3), torch.zeros(3, 3)
    with pytest.raises(ValueError, match=rf"gae needs .* prefix .* {bad_row}"):
        gae(rewards, values, mask, gamma=1.0, lam=0.95)
    with pytest.raises(ValueError, match=rf"discounted_returns needs .* {bad_row}"):
        discounted_returns(rewards, mask, gamma=0.9)
    with pytest.raises(ValueError, match=bad_row):  # and so does reinforce++, which uses it
        compute_advantages("reinforce++", AdvantageInputs(rewards, mask), AdvantageSettings())


@pytest.mark.parametrize("name", ["grpo", "rloo"])
@pytest.mark.parametrize("group_size", [4, 1])
def test_group_estimators_refuse_a_group_size_that_does_not_divide_the_batch(
    name: str, group_size: int
) -> None:
    inputs = _hand_inputs()._replace(group_size=group_size)  # B = 6
    with pytest.raises(ValueError, match="group_size"):
        compute_advantages(name, inputs, AdvantageSettings())


def test_unknown_advantage_estimator_raises_listing_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown advantage estimator 'ppo'.*gae, grpo, rloo, reinforce\+\+"
    ):
        compute_advantages("ppo", _hand_inputs(), AdvantageSettings())
