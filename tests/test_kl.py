"""KL estimators, KL-shaped rewards and the KL coefficient controllers."""

from __future__ import annotations

import math

import pytest
import torch

from tether.kl import (
    EXACT_KL,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    KLTerms,
    kl_full,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_needs_logits,
    kl_needs_loss_term,
    kl_shaped_rewards,
    make_kl_controller,
    token_kl,
)

LOG2 = math.log(2.0)


def test_estimators_by_hand() -> None:
    # token 0: p = 0.5, q = 0.25 -> log p - log q = log 2
    #   k1 = log 2 = 0.693147; k2 = (log 2)^2 / 2 = 0.240227; k3 = (q/p - 1) - log(q/p) = -0.5 + log 2 = 0.193147
    # token 1: p = 0.25, q = 0.5 -> log p - log q = -log 2
    #   k1 = -log 2; k2 = 0.240227; k3 = (2 - 1) - log 2 = 0.306853
    # token 2: p = q -> all three are 0
    logp = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.3)]])
    logq = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.3)]])
    torch.testing.assert_close(kl_k1(logp, logq), torch.tensor([[LOG2, -LOG2, 0.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        kl_k2(logp, logq), torch.tensor([[LOG2**2 / 2, LOG2**2 / 2, 0.0]]), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        kl_k3(logp, logq), torch.tensor([[LOG2 - 0.5, 1 - LOG2, 0.0]]), rtol=0, atol=1e-6
    )
    terms = KLTerms(logp, logq)
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):  # the registry's entries are these functions
        torch.testing.assert_close(token_kl(name, terms), fn(logp, logq), rtol=0, atol=0)
        assert not KL_ESTIMATORS[name].needs_logits


def test_estimators_return_float32_from_low_precision_inputs() -> None:
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16)
    logq = torch.tensor([[-2.0, -1.0]], dtype=torch.bfloat16)
    for fn in (kl_k1, kl_k2, kl_k3):
        assert fn(logp, logq).dtype == torch.float32


def test_k3_keeps_precision_when_the_models_agree() -> None:
    # log r = 1e-4: k3 = expm1(x) - x ~= x^2 / 2 = 5e-9. Written as exp(x) - 1 - x in float32 the
    # cancellation in exp(x) - 1 has an error of ~6e-8, more than ten times the answer.
    logp = torch.zeros(1)
    logq = torch.full((1,), 1e-4)
    x = float(logq.double().item())  # the float32 value, in float64
    exact = math.expm1(x) - x
    assert kl_k3(logp, logq).item() == pytest.approx(exact, rel=1e-3)


def test_estimators_on_sampled_categoricals() -> None:
    """E_p[k1] and E_p[k3] equal KL(p || q) (Schulman 2020); k3 >= 0 per sample while k1 is not."""
    g = torch.Generator().manual_seed(1234)
    V, N = 10, 200_000
    p = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    exact_kl = (p * (p.log() - q.log())).sum().item()
    samples = torch.multinomial(p, N, replacement=True, generator=g)
    logp, logq = p.log()[samples].float(), q.log()[samples].float()
    k1, k3 = kl_k1(logp, logq).double(), kl_k3(logp, logq).double()

    # Tolerance: 5 standard errors of the sample mean, with each estimator's std computed exactly
    # from p and q (not from the samples). It must be small next to the KL itself to mean anything.
    log_ratio = p.log() - q.log()
    k1_std = math.sqrt((p * (log_ratio - exact_kl) ** 2).sum().item())
    k3_values = torch.expm1(-log_ratio) + log_ratio
    k3_std = math.sqrt((p * (k3_values - exact_kl) ** 2).sum().item())
    tol1, tol3 = 5 * k1_std / math.sqrt(N), 5 * k3_std / math.sqrt(N)
    assert exact_kl > 0.3
    assert tol1 < 0.05 * exact_kl and tol3 < 0.05 * exact_kl

    assert abs(k1.mean().item() - exact_kl) < tol1
    assert abs(k3.mean().item() - exact_kl) < tol3
    assert (k3 >= 0).all()
    assert (k1 < 0).any()
    # k2 is biased: its mean is measurably off the exact KL for these p and q
    k2_mean = kl_k2(logp, logq).double().mean().item()
    assert abs(k2_mean - exact_kl) > 10 * tol1


def test_kl_shaped_rewards_by_hand() -> None:
    kl = torch.tensor(
        [
            [0.1, 0.2, 9.0, 9.0],  # EOS at position 1: mask keeps 0..1
            [0.3, -0.4, 0.5, 0.6],  # hit the length limit: all four kept
            [9.0, 9.0, 9.0, 9.0],  # empty response
        ]
    )
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [False, False, False, False]])
    scores = torch.tensor([2.0, 3.0, 5.0])
    rewards, non_score = kl_shaped_rewards(scores, kl, mask, kl_coef=0.1)
    # non-score: -0.1 * kl inside the mask, exactly 0 outside
    expected_non_score = torch.tensor(
        [[-0.01, -0.02, 0.0, 0.0], [-0.03, 0.04, -0.05, -0.06], [0.0, 0.0, 0.0, 0.0]]
    )
    # the score goes on the last valid token: row 0 at t=1 (the EOS), row 1 at t=3 (last token),
    # row 2 nowhere (no token to carry it)
    expected_rewards = torch.tensor(
        [[-0.01, 2.0 - 0.02, 0.0, 0.0], [-0.03, 0.04, -0.05, 3.0 - 0.06], [0.0, 0.0, 0.0, 0.0]]
    )
    torch.testing.assert_close(non_score, expected_non_score, rtol=0, atol=1e-6)
    torch.testing.assert_close(rewards, expected_rewards, rtol=0, atol=1e-6)
    assert (rewards[~mask] == 0).all() and (non_score[~mask] == 0).all()
    # rewards - non_score is the score placed at exactly one position per non-empty row
    torch.testing.assert_close(
        rewards - non_score,
        torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]]),
        rtol=0,
        atol=1e-6,
    )


def test_kl_shaped_rewards_nan_outside_the_mask_does_not_leak() -> None:
    kl = torch.tensor([[0.5, float("nan")]])
    mask = torch.tensor([[True, False]])
    rewards, non_score = kl_shaped_rewards(torch.tensor([1.0]), kl, mask, kl_coef=0.2)
    # -0.2 * 0.5 + 1 = 0.9 at t=0; t=1 is masked -> exactly 0
    torch.testing.assert_close(rewards, torch.tensor([[0.9, 0.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(non_score, torch.tensor([[-0.1, 0.0]]), rtol=0, atol=1e-6)


def test_adaptive_controller_hand_computed_sequence() -> None:
    # Ziegler et al. 2019: e = clip(KL/target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon)
    # beta0 = 0.1, target = 6, horizon = 100, n = 10 each update (n / horizon = 0.1)
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=100)
    steps = [
        # KL = 6.6: e = 0.1 (inside)            -> factor 1 + 0.1 * 0.1 = 1.01  -> 0.101
        (6.6, 0.101),
        # KL = 12: e = 1 clipped to +0.2         -> factor 1.02                  -> 0.10302
        (12.0, 0.10302),
        # KL = 0: e = -1 clipped to -0.2         -> factor 0.98                  -> 0.1009596
        (0.0, 0.1009596),
        # KL = 5.4: e = -0.1 (inside)            -> factor 0.99                  -> 0.099950004
        (5.4, 0.099950004),
        # KL = 6: e = 0                          -> unchanged
        (6.0, 0.099950004),
    ]
    for current_kl, expected in steps:
        ctl.update(current_kl, n_steps=10)
        assert ctl.value == pytest.approx(expected, rel=1e-9)


def test_adaptive_controller_scales_with_episodes_seen() -> None:
    # n_steps = 50, horizon = 100, e = +0.2 (clipped from 1.0): factor 1 + 0.2 * 0.5 = 1.1
    ctl = AdaptiveKLController(value=0.2, target=1.0, horizon=100)
    ctl.update(2.0, n_steps=50)
    assert ctl.value == pytest.approx(0.22, rel=1e-9)


def test_fixed_controller_never_moves_and_state_round_trips() -> None:
    ctl = FixedKLController(0.05)
    for current_kl in (0.0, 1e-3, 5.0, 1e6, -3.0):
        ctl.update(current_kl, n_steps=1000)
        assert ctl.value == 0.05
    adaptive = AdaptiveKLController(0.1, 6.0, 100)
    adaptive.update(12.0, 10)
    other = AdaptiveKLController(0.5, 6.0, 100)
    other.load_state_dict(adaptive.state_dict())
    assert other.value == adaptive.value


def test_make_kl_controller() -> None:
    fixed = make_kl_controller(0.05, None, 10_000)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    adaptive = make_kl_controller(0.1, 6.0, 500)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.1, 6.0, 500)
    for target, horizon in ((0.0, 100), (-1.0, 100), (6.0, 0), (6.0, -5)):
        with pytest.raises(ValueError, match="target > 0 and horizon > 0"):
            make_kl_controller(0.1, target, horizon)


def _random_kl_terms(temperature: float) -> KLTerms:
    """Logits of two models for B=2, T=3, V=5 and the sampled tokens' logprobs at ``temperature``."""
    g = torch.Generator().manual_seed(21)
    logits, ref_logits = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    tokens = torch.randint(0, 5, (2, 3, 1), generator=g)
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, tokens).squeeze(-1)
    logq = torch.log_softmax(ref_logits / temperature, -1).gather(-1, tokens).squeeze(-1)
    return KLTerms(logp, logq, logits, ref_logits, temperature)


# The direct function each registry entry must equal.
DIRECT_KL = {
    "k1": lambda t: kl_k1(t.logprobs, t.ref_logprobs),
    "k2": lambda t: kl_k2(t.logprobs, t.ref_logprobs),
    "k3": lambda t: kl_k3(t.logprobs, t.ref_logprobs),
    "full": lambda t: kl_full(t.logits, t.ref_logits, t.temperature),
}


def test_kl_registry_holds_exactly_the_known_estimators() -> None:
    assert set(KL_ESTIMATORS) == set(DIRECT_KL)
    assert EXACT_KL == "full"


@pytest.mark.parametrize("name", sorted(DIRECT_KL))
def test_token_kl_equals_the_direct_function(name: str) -> None:
    terms = _random_kl_terms(temperature=0.7)
    out = token_kl(name, terms)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out, DIRECT_KL[name](terms), rtol=0, atol=0)
    assert kl_needs_logits(name) == (name == "full")


def test_token_kl_full_reads_the_temperature() -> None:
    # the same logits at temperature 0.7 and 1.0 give different exact KLs: the temperature is not dropped
    hot, cold = _random_kl_terms(1.0), _random_kl_terms(0.7)
    assert (token_kl("full", hot) - token_kl("full", cold)).abs().max() > 1e-3
    # and at equal logits the exact KL is 0 at every token
    same = hot._replace(ref_logits=hot.logits)
    assert (token_kl("full", same) == 0).all()


def test_token_kl_full_without_logits_raises() -> None:
    terms = _random_kl_terms(1.0)
    with pytest.raises(ValueError, match="logits"):
        token_kl("full", KLTerms(terms.logprobs, terms.ref_logprobs))
    with pytest.raises(ValueError, match="logits"):
        token_kl("full", terms._replace(ref_logits=None))
    # the logprob estimators need no logits
    torch.testing.assert_close(
        token_kl("k3", KLTerms(terms.logprobs, terms.ref_logprobs)), token_kl("k3", terms), rtol=0, atol=0
    )


def test_token_kl_unknown_estimator_raises_listing_the_known_ones() -> None:
    terms = _random_kl_terms(1.0)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'.*k1, k2, k3, full"):
        token_kl("k4", terms)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_needs_logits("k4")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "full"])
def test_kl_needs_loss_term_truth_table(estimator: str) -> None:
    # in the loss: always a loss term. In the reward: only the full KL, whose per-token value does not
    # depend on the sampled token, so the policy gradient misses its direct gradient.
    assert kl_needs_loss_term("loss", estimator) is True
    assert kl_needs_loss_term("reward", estimator) is (estimator == "full")


def test_kl_shaped_rewards_puts_the_score_on_the_last_true_of_any_mask() -> None:
    kl = torch.tensor(
        [
            [9.0, 9.0, 0.1, 0.2],  # left-padded: mask keeps 2..3
            [0.3, 9.0, 0.4, 9.0],  # a hole at t=1: mask keeps 0 and 2
            [9.0, 9.0, 9.0, 9.0],  # empty
            [9.0, 0.5, 9.0, 9.0],  # a single token in the middle
        ]
    )
    mask = torch.tensor(
        [
            [False, False, True, True],
            [True, False, True, False],
            [False, False, False, False],
            [False, True, False, False],
        ]
    )
    scores = torch.tensor([2.0, 3.0, 5.0, -1.0])
    rewards, non_score = kl_shaped_rewards(scores, kl, mask, kl_coef=0.1)
    # -0.1 * kl on kept tokens; the score on the last True: row 0 at t=3, row 1 at t=2 (not t=0, not the
    # hole), row 2 nowhere, row 3 at t=1; every position outside the mask exactly 0
    expected = torch.tensor(
        [
            [0.0, 0.0, -0.01, 2.0 - 0.02],
            [-0.03, 0.0, 3.0 - 0.04, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [0.0, -1.0 - 0.05, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        non_score,
        torch.tensor([[0.0, 0.0, -0.01, -0.02], [-0.03, 0.0, -0.04, 0.0], [0.0] * 4, [0.0, -0.05, 0.0, 0.0]]),
        rtol=0,
        atol=1e-6,
    )
    assert (rewards[~mask] == 0).all() and (non_score[~mask] == 0).all()
    # the empty row carries no score anywhere: its total is 0, not 5
    assert rewards[2].abs().sum().item() == 0.0


def test_kl_shaped_rewards_keep_a_nan_score_of_an_empty_row_out():
    # An empty row has no token to carry its score; a non-finite score there must not appear anywhere.
    mask = torch.tensor([[True, True], [False, False]])
    rewards, _ = kl_shaped_rewards(torch.tensor([1.0, float("nan")]), torch.zeros(2, 2), mask, 0.1)
    assert rewards.tolist() == [[0.0, 1.0], [0.0, 0.0]]
