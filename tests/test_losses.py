"""PPO clipped surrogate, clipped value loss and loss aggregation, against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from tether.losses import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    PolicyLossSettings,
    aggregate,
    dual_clip_loss,
    gspo_loss,
    loss_normalizer,
    policy_loss,
    ppo_clip_loss,
    value_loss,
)


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


def test_ppo_clip_loss_splits_clipped_low_and_high() -> None:
    # the hand case of test_ppo_clip_loss_each_branch_by_hand: token 1 (A=2, r=1.5 > 1.2) took the high
    # clip; token 3 (A=-1, r=0.5 < 0.8) the low one; tokens 4 and 5 are outside the range on the
    # pessimistic side (unclipped branch taken) and token 6 is masked, so neither flag is set there
    new, old = _ratios_to_logprobs([1.1, 1.5, 0.9, 0.5, 0.5, 1.5, 2.0])
    adv = torch.tensor([[2.0, 2.0, -1.0, -1.0, 2.0, -1.0, 5.0]])
    mask = torch.tensor([[True] * 6 + [False]])
    out = ppo_clip_loss(new, old, adv, mask, clip_low=0.2)
    assert out.clipped_high.tolist() == [[False, True, False, False, False, False, False]]
    assert out.clipped_low.tolist() == [[False, False, False, True, False, False, False]]
    assert torch.equal(out.clipped, out.clipped_low | out.clipped_high)


def test_dual_clip_loss_each_branch_by_hand() -> None:
    # eps = 0.2, c = 3. PPO: max(-A r, -A clip(r, 0.8, 1.2)); dual-clip: min(that, -c A) when A < 0.
    # gradient d/dlogp: -A r on the unclipped branch, 0 on a clipped or capped one.
    #  0: A=-1, r=5   (far above 1.2) -> PPO max(5, 1.2) = 5; cap 3 binds -> 3, grad 0
    #  1: A=-1, r=2   (above 1.2, below c) -> max(2, 1.2) = 2 < 3 -> 2, grad 2 (as PPO)
    #  2: A=-1, r=0.9 (inside)        -> 0.9, grad 0.9
    #  3: A=-1, r=0.5 (below 0.8)     -> max(0.5, 0.8) = 0.8, grad 0, clipped_low
    #  4: A=2,  r=5                   -> max(-10, -2.4) = -2.4, grad 0, clipped_high (cap never applies to A>0)
    #  5: A=2,  r=1.1 (inside)        -> -2.2, grad -2.2
    #  6: A=-1, r=5, masked           -> 0, grad 0
    new, old = _ratios_to_logprobs([5.0, 2.0, 0.9, 0.5, 5.0, 1.1, 5.0])
    new.requires_grad_(True)
    adv = torch.tensor([[-1.0, -1.0, -1.0, -1.0, 2.0, 2.0, -1.0]])
    mask = torch.tensor([[True] * 6 + [False]])
    out = dual_clip_loss(new, old, adv, mask, PolicyLossSettings(clip_low=0.2, dual_clip=3.0))
    torch.testing.assert_close(
        out.loss, torch.tensor([[3.0, 2.0, 0.9, 0.8, -2.4, -2.2, 0.0]]), rtol=0, atol=1e-5
    )
    out.loss.sum().backward()
    torch.testing.assert_close(
        new.grad, torch.tensor([[0.0, 2.0, 0.9, 0.0, 0.0, -2.2, 0.0]]), rtol=0, atol=1e-5
    )
    assert out.clipped_low.tolist() == [[False, False, False, True, False, False, False]]
    assert out.clipped_high.tolist() == [[False, False, False, False, True, False, False]]


def test_dual_clip_equals_ppo_clip_where_the_cap_does_not_bind() -> None:
    # the cap only changes A < 0 tokens with r > c; with every ratio below c = 3 the two losses are the same
    g = torch.Generator().manual_seed(8)
    old = torch.randn(4, 6, generator=g) - 2
    new = old + 0.3 * torch.randn(4, 6, generator=g).clamp(-3, 3)  # ratios within exp(+-0.9): 0.41 .. 2.46
    adv, mask = torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g) > 0.3
    # some kept A < 0 tokens have a ratio above 1 + eps: the branch the cap would act on next
    assert (((new - old).exp() > 1.2) & (adv < 0) & mask).any()
    dual = dual_clip_loss(new, old, adv, mask, PolicyLossSettings(clip_low=0.2, dual_clip=3.0))
    ppo = ppo_clip_loss(new, old, adv, mask, clip_low=0.2)
    torch.testing.assert_close(dual.loss, ppo.loss, rtol=0, atol=0)
    assert torch.equal(dual.clipped_low, ppo.clipped_low) and torch.equal(dual.clipped_high, ppo.clipped_high)


def test_dual_clip_refuses_a_bound_of_at_most_one() -> None:
    new, old = _ratios_to_logprobs([1.0])
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        dual_clip_loss(
            new, old, torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), PolicyLossSettings(dual_clip=1.0)
        )


def test_gspo_ratio_and_clipping_are_per_sequence_by_hand() -> None:
    # log ratios (new - old) per token; clip eps = 0.2 (range 0.8 .. 1.2), A = 1 on every token
    #  row 0: 0.1, 0.3, (masked 5.0) -> mean 0.2 -> s = exp(0.2) = 1.2214028 > 1.2 -> whole row clipped,
    #         loss -1.2 on both tokens (token-level PPO would not clip t=0: exp(0.1) = 1.105)
    #  row 1: -0.3, 0.0, 0.6          -> mean 0.1 -> s = exp(0.1) = 1.1051709 -> no token clipped, loss -1.1051709
    #         (token-level PPO would clip t=2: exp(0.6) = 1.82)
    #  row 2: empty                    -> ratio 1, loss 0
    old = torch.full((3, 3), -1.0)
    new = old + torch.tensor([[0.1, 0.3, 5.0], [-0.3, 0.0, 0.6], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    adv = torch.ones(3, 3)
    out = gspo_loss(new, old, adv, mask, PolicyLossSettings(clip_low=0.2))
    s0, s1 = math.exp(0.2), math.exp(0.1)
    torch.testing.assert_close(
        out.ratio, torch.tensor([[s0, s0, 1.0], [s1, s1, s1], [1.0, 1.0, 1.0]]), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        out.loss, torch.tensor([[-1.2, -1.2, 0.0], [-s1, -s1, -s1], [0.0, 0.0, 0.0]]), rtol=0, atol=1e-6
    )
    assert out.clipped_high.tolist() == [[True, True, False], [False, False, False], [False, False, False]]
    assert not out.clipped_low.any()
    # with A = -1 row 0 sits on the pessimistic side (not clipped) and row 1 stays inside
    neg = gspo_loss(new, old, -adv, mask, PolicyLossSettings(clip_low=0.2))
    assert not neg.clipped.any()
    torch.testing.assert_close(neg.loss[0, :2], torch.tensor([s0, s0]), rtol=0, atol=1e-6)


def test_gspo_gradient_equals_the_naive_sequence_objective() -> None:
    """GSPO-token with seq-mean-token-mean has the gradient of mean_i max(-A_i s_i, -A_i clip(s_i))."""
    g = torch.Generator().manual_seed(5)
    B, T = 6, 5
    lengths = [5, 1, 3, 4, 2, 5]
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    old = torch.randn(B, T, generator=g) - 2
    new = (old + 0.3 * torch.randn(B, T, generator=g)).requires_grad_(True)
    adv_row = torch.tensor([1.0, -1.0, 0.5, -2.0, 1.5, -0.5])
    adv = adv_row.unsqueeze(-1).expand(B, T)
    settings = PolicyLossSettings(clip_low=0.1)

    out = gspo_loss(new, old, adv, mask, settings)
    (grad_fast,) = torch.autograd.grad(aggregate(out.loss, mask, "seq-mean-token-mean"), new)

    # the naive objective, one sequence at a time, on the same leaf
    terms = []
    for i, n in enumerate(lengths):
        s = torch.exp((new[i, :n] - old[i, :n]).mean())
        terms.append(torch.maximum(-adv_row[i] * s, -adv_row[i] * torch.clamp(s, 0.9, 1.1)))
    naive = torch.stack(terms).mean()
    (grad_naive,) = torch.autograd.grad(naive, new)

    clipped_rows = out.clipped.any(-1)
    assert clipped_rows.any() and not clipped_rows.all()  # both kinds of row are exercised
    torch.testing.assert_close(aggregate(out.loss, mask, "seq-mean-token-mean"), naive, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_fast, grad_naive, rtol=0, atol=1e-6)
    assert (grad_fast[clipped_rows] == 0).all() and (grad_fast[~mask] == 0).all()
    assert (grad_fast[~clipped_rows.unsqueeze(-1) & mask] != 0).all()


def test_policy_loss_registry_lookup() -> None:
    assert set(POLICY_LOSSES) == {"ppo-clip", "dual-clip", "gspo"}
    new, old = _ratios_to_logprobs([1.1, 1.5, 0.5, 6.0])
    adv = torch.tensor([[2.0, 2.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    settings = PolicyLossSettings(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    direct = {
        "ppo-clip": ppo_clip_loss(new, old, adv, mask, clip_low=0.2, clip_high=0.28),
        "dual-clip": dual_clip_loss(new, old, adv, mask, settings),
        "gspo": gspo_loss(new, old, adv, mask, settings),
    }
    for name, expected in direct.items():
        got = policy_loss(name, new, old, adv, mask, settings)
        torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
        torch.testing.assert_close(got.ratio, expected.ratio, rtol=0, atol=0)
    # the settings reach ppo-clip: with clip_high 0.28 token 1 is -2 * 1.28 = -2.56 (not -2.4)
    assert policy_loss("ppo-clip", new, old, adv, mask, settings).loss[0, 1].item() == pytest.approx(
        -2.56, abs=1e-5
    )
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'.*ppo-clip, dual-clip, gspo"):
        policy_loss("ppo", new, old, adv, mask, settings)


AGG_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [10.0, 20.0, 30.0]])
AGG_MASK = torch.tensor(
    [[True, True, False], [True, False, False], [False, False, False], [True, True, True]]
)


def test_every_aggregation_mode_by_hand() -> None:
    # kept tokens: row 0: 1, 2; row 1: 4; row 2: none; row 3: 10, 20, 30. B = 4, 6 tokens, token sum 67.
    #  token-mean:                 67 / 6
    #  seq-mean(-token-mean):      row means 1.5, 4, 0, 20 -> 25.5 / 4 = 6.375
    #  seq-mean-token-sum:         row sums 3, 4, 0, 60 -> 67 / 4 = 16.75
    #  token-sum-norm, constant 8: 67 / (4 * 8) = 2.09375
    expected = {
        "token-mean": (67 / 6, 6.0),
        "seq-mean": (6.375, 4.0),
        "seq-mean-token-mean": (6.375, 4.0),
        "seq-mean-token-sum": (16.75, 4.0),
        "token-sum-norm": (67 / 32, 32.0),
    }
    assert set(expected) == set(LOSS_AGGREGATIONS)
    for mode, (value, normalizer) in expected.items():
        assert aggregate(AGG_LOSS, AGG_MASK, mode, constant=8).item() == pytest.approx(value, abs=1e-5), mode
        assert loss_normalizer(AGG_MASK, mode, constant=8) == normalizer, mode


def test_token_sum_norm_without_a_constant_raises() -> None:
    for constant in (None, 0.0, -8.0):
        with pytest.raises(ValueError, match="token-sum-norm needs a positive constant"):
            aggregate(AGG_LOSS, AGG_MASK, "token-sum-norm", constant=constant)
        with pytest.raises(ValueError, match="token-sum-norm needs a positive constant"):
            loss_normalizer(AGG_MASK, "token-sum-norm", constant=constant)


@pytest.mark.parametrize("mode", sorted(LOSS_AGGREGATIONS))
def test_micro_batch_invariance_of_every_mode(mode: str) -> None:
    g = torch.Generator().manual_seed(12)
    B, T = 8, 6
    loss = torch.randn(B, T, generator=g)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor([6, 1, 3, 0, 5, 2, 6, 4]).unsqueeze(1)
    mask[2, 0] = False  # a hole: aggregation does not need a prefix mask
    full = aggregate(loss, mask, mode, constant=8)
    normalizer = loss_normalizer(mask, mode, constant=8)
    for splits in ([(0, 3), (3, 5), (5, 8)], [(i, i + 1) for i in range(B)], [(0, 4), (4, 8)], [(0, 8)]):
        summed = sum(aggregate(loss[i:j], mask[i:j], mode, normalizer) for i, j in splits)
        torch.testing.assert_close(summed, full, rtol=0, atol=1e-6)
