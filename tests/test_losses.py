"""PPO clipped surrogate, clipped value loss and loss aggregation, against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from tether.losses import aggregate, loss_normalizer, ppo_clip_loss, value_loss


def _ratios_to_logprobs(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """New/old logprobs whose ratio exp(new - old) is each of ``ratios`` (old = log 0.3)."""
    old = torch.full((1, len(ratios)), math.log(0.3))
    new = old + torch.tensor([[math.log(r) for r in ratios]])
    return new, old


def test_ppo_clip_loss_each_branch_by_hand() -> None:
    # L = max(-A r, -A clip(r, 0.8, 1.2)), eps = 0.2
    #  0: A= 2, r=1.1 (inside)       -> -2.2, -2.2            -> -2.2   not clipped
    #  1: A= 2, r=1.5 (above 1.2)    -> -3.0, -2.4            -> -2.4   clipped
    #  2: A=-1, r=0.9 (inside)       ->  0.9,  0.9            ->  0.9   not clipped
    #  3: A=-1, r=0.5 (below 0.8)    ->  0.5,  0.8            ->  0.8   clipped
    #  4: A= 2, r=0.5 (below, A>0)   -> -1.0, -1.6            -> -1.0   not clipped (pessimistic side)
    #  5: A=-1, r=1.5 (above, A<0)   ->  1.5,  1.2            ->  1.5   not clipped (pessimistic side)
    #  6: masked out (A=5, r=2)      -> 0                               not clipped
    new, old = _ratios_to_logprobs([1.1, 1.5, 0.9, 0.5, 0.5, 1.5, 2.0])
    adv = torch.tensor([[2.0, 2.0, -1.0, -1.0, 2.0, -1.0, 5.0]])
    mask = torch.tensor([[True] * 6 + [False]])
    out = ppo_clip_loss(new, old, adv, mask, clip_low=0.2)
    torch.testing.assert_close(
        out.loss, torch.tensor([[-2.2, -2.4, 0.9, 0.8, -1.0, 1.5, 0.0]]), rtol=0, atol=1e-5
    )
    assert out.clipped.tolist() == [[False, True, False, True, False, False, False]]
    # outside the mask the log-ratio is zeroed before exp (padding can hold -inf - -inf), so the ratio is 1
    torch.testing.assert_close(
        out.ratio, torch.tensor([[1.1, 1.5, 0.9, 0.5, 0.5, 1.5, 1.0]]), rtol=0, atol=1e-5
    )


def test_ppo_clip_loss_separate_clip_high() -> None:
    # clip_low = 0.2, clip_high = 0.28 (DAPO clip-higher): clip(r, 0.8, 1.28)
    #  0: A=2,  r=1.25 -> inside the high side now: -2.5, not clipped (symmetric 0.2 would give -2.4, clipped)
    #  1: A=2,  r=1.5  -> -3.0 vs -2 * 1.28 = -2.56 -> -2.56, clipped
    #  2: A=-1, r=0.5  -> low side unchanged: 0.5 vs 0.8 -> 0.8, clipped
    #  3: A=-1, r=0.75 -> 0.75 vs 0.8 -> 0.8, clipped (would be inside if clip_low were 0.28)
    new, old = _ratios_to_logprobs([1.25, 1.5, 0.5, 0.75])
    adv = torch.tensor([[2.0, 2.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = ppo_clip_loss(new, old, adv, mask, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(out.loss, torch.tensor([[-2.5, -2.56, 0.8, 0.8]]), rtol=0, atol=1e-5)
    assert out.clipped.tolist() == [[False, True, True, True]]
    symmetric = ppo_clip_loss(new, old, adv, mask, clip_low=0.2)
    torch.testing.assert_close(symmetric.loss, torch.tensor([[-2.4, -2.4, 0.8, 0.8]]), rtol=0, atol=1e-5)
    assert symmetric.clipped.tolist() == [[True, True, True, True]]


def test_ppo_approx_kl() -> None:
    # approx_kl = (r - 1) - log r per token (k3 of KL(old || new)):
    #   r = 1.1 -> 0.1 - 0.0953102 = 0.0046898;  r = 0.5 -> -0.5 + 0.6931472 = 0.1931472;  r = 1 -> 0
    new, old = _ratios_to_logprobs([1.1, 0.5, 1.0, 3.0])
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True, False]])
    out = ppo_clip_loss(new, old, adv, mask)
    torch.testing.assert_close(
        out.approx_kl, torch.tensor([[0.0046898, 0.1931472, 0.0, 0.0]]), rtol=0, atol=1e-6
    )
    assert out.approx_kl[0, 2].item() == 0.0
    g = torch.Generator().manual_seed(0)
    old = torch.randn(6, 10, generator=g) - 2
    new = old + 0.5 * torch.randn(6, 10, generator=g)
    out = ppo_clip_loss(new, old, torch.randn(6, 10, generator=g), torch.ones(6, 10, dtype=torch.bool))
    assert (out.approx_kl >= 0).all()
    assert (out.approx_kl > 0).all()  # no ratio is exactly 1 here
    same = ppo_clip_loss(old, old, torch.randn(6, 10, generator=g), torch.ones(6, 10, dtype=torch.bool))
    assert (same.approx_kl == 0).all()
    assert not same.clipped.any()


def test_ppo_loss_gradient_flows_only_through_the_unclipped_branch() -> None:
    # d/dlogp of -A * r = -A * r on unclipped tokens; 0 where the clipped (constant) branch is taken
    new, old = _ratios_to_logprobs([1.1, 1.5])
    new.requires_grad_(True)
    adv = torch.tensor([[2.0, 2.0]])
    out = ppo_clip_loss(new, old, adv, torch.ones(1, 2, dtype=torch.bool))
    out.loss.sum().backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-2.2, 0.0]]), rtol=0, atol=1e-5)


def test_value_loss_by_hand() -> None:
    # clip_range = 0.2: V_clip = V_old + clip(V - V_old, -0.2, 0.2); loss = 0.5 * max((V-R)^2, (V_clip-R)^2)
    #  0: V=1.0, V_old=0.5, R=2 -> (1-2)^2 = 1; V_clip = 0.7 -> 1.69 -> 0.5 * 1.69 = 0.845, clipped
    #  1: V=1.0, V_old=0.5, R=0 -> 1;            V_clip = 0.7 -> 0.49 -> 0.5 * 1    = 0.5,   not clipped
    #  2: V=0.6, V_old=0.5, R=2 -> 1.96;         V_clip = 0.6 -> 1.96 -> 0.98,               not clipped
    #  3: V=0.0, V_old=0.5, R=1 -> 1;            V_clip = 0.3 -> 0.49 -> 0.5,                not clipped
    #  4: V=0.0, V_old=0.5, R=-1 -> 1;           V_clip = 0.3 -> 1.69 -> 0.845,              clipped
    #  5: masked -> 0
    values = torch.tensor([[1.0, 1.0, 0.6, 0.0, 0.0, 7.0]])
    old_values = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 2.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[True] * 5 + [False]])
    out = value_loss(values, old_values, returns, mask, clip_range=0.2)
    torch.testing.assert_close(
        out.loss, torch.tensor([[0.845, 0.5, 0.98, 0.5, 0.845, 0.0]]), rtol=0, atol=1e-6
    )
    assert out.clipped.tolist() == [[True, False, False, False, True, False]]
    # clip_range=None: plain 0.5 * (V - R)^2 -> 0.5, 0.5, 0.98, 0.5, 0.5; masked 0; nothing clipped
    plain = value_loss(values, old_values, returns, mask, clip_range=None)
    torch.testing.assert_close(plain.loss, torch.tensor([[0.5, 0.5, 0.98, 0.5, 0.5, 0.0]]), rtol=0, atol=1e-6)
    assert not plain.clipped.any()


def test_aggregate_by_hand() -> None:
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [10.0, 20.0, 30.0]])
    mask = torch.tensor(
        [[True, True, False], [True, False, False], [False, False, False], [True, True, True]]
    )
    # token-mean: (1 + 2 + 4 + 10 + 20 + 30) / 6 valid tokens = 67/6
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(67.0 / 6.0, abs=1e-5)
    # seq-mean: per-sequence means 1.5, 4, 0 (empty row), 20, summed / B = 25.5 / 4 = 6.375
    assert aggregate(loss, mask, "seq-mean").item() == pytest.approx(6.375, abs=1e-5)
    # an explicit normalizer replaces the count: 67 / 67 = 1; 25.5 / 51 = 0.5
    assert aggregate(loss, mask, "token-mean", normalizer=67.0).item() == pytest.approx(1.0, abs=1e-6)
    assert aggregate(loss, mask, "seq-mean", normalizer=51.0).item() == pytest.approx(0.5, abs=1e-6)
    # the normalizers: 6 valid tokens; 4 sequences (the empty one counts)
    assert loss_normalizer(mask, "token-mean") == 6.0
    assert loss_normalizer(mask, "seq-mean") == 4.0
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(loss, mask, "sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        loss_normalizer(mask, "sum")  # type: ignore[arg-type]


def test_aggregate_of_an_all_masked_batch_is_zero_not_nan() -> None:
    loss = torch.tensor([[float("nan"), 2.0]])
    mask = torch.zeros(1, 2, dtype=torch.bool)
    assert aggregate(loss, mask, "token-mean").item() == 0.0
    assert aggregate(loss, mask, "seq-mean").item() == 0.0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean"])
def test_micro_batch_invariance(mode: str) -> None:
    g = torch.Generator().manual_seed(11)
    B, T = 8, 6
    loss = torch.randn(B, T, generator=g)
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 6, 4])
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    full = aggregate(loss, mask, mode)
    normalizer = loss_normalizer(mask, mode)
    for splits in ([(0, 3), (3, 5), (5, 8)], [(i, i + 1) for i in range(B)], [(0, 4), (4, 8)]):
        summed = sum(aggregate(loss[i:j], mask[i:j], mode, normalizer) for i, j in splits)
        torch.testing.assert_close(summed, full, rtol=0, atol=1e-6)


def test_micro_batch_invariance_needs_the_global_normalizer() -> None:
    """Without the global token count, accumulating token-means over micro-batches is a different loss."""
    g = torch.Generator().manual_seed(11)
    loss = torch.randn(8, 6, generator=g)
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 6, 4])
    mask = torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)
    full = aggregate(loss, mask, "token-mean")
    splits = [(0, 4), (4, 8)]
    # the usual gradient-accumulation mistake: each micro-batch's own mean, divided by the number of steps
    local = sum(aggregate(loss[i:j], mask[i:j], "token-mean") for i, j in splits) / len(splits)
    assert abs(local.item() - full.item()) > 1e-2
    # and plain summing of local means is off as well
    summed_local = sum(aggregate(loss[i:j], mask[i:j], "token-mean") for i, j in splits)
    assert abs(summed_local.item() - full.item()) > 1e-2


def test_ppo_clip_loss_gradient_stays_finite_with_inf_logprobs_at_padding() -> None:
    """Warped sampling gives -inf logprobs at padding; -inf - -inf must not turn the gradient into NaN."""
    new = torch.tensor([[-0.5, -1.0, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-0.6, -1.0, float("-inf")]])
    mask = torch.tensor([[True, True, False]])
    out = ppo_clip_loss(new, old, torch.tensor([[1.0, -1.0, 3.0]]), mask)
    aggregate(out.loss, mask, "token-mean").backward()
    assert torch.isfinite(new.grad).all()
    assert new.grad[0, 2] == 0.0
