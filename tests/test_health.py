"""Tests for tether.health: each warning fires on a stream showing its problem, and only then."""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Callable

import pytest

from tether.health import ADVICE, HEALTH_CODES, HealthMonitor, HealthWarning, check_history

MAX_NEW_TOKENS = 32
Row = dict[str, float]


def healthy_stream(n: int = 120, seed: int = 0) -> list[Row]:
    """A PPO run going well: reward rising through the noise, KL growing but within 0..10, entropy easing
    down, responses of a sensible length ending with EOS, value head fitting after a few steps."""
    rng = random.Random(seed)
    rows = []
    for step in range(1, n + 1):
        rows.append(
            {
                "step": step,
                "episode": 64 * step,
                "time": 1000.0 + step,
                "objective/scores": 0.1 + 0.004 * step + rng.gauss(0, 0.02),
                "objective/scores_std": 0.3 + rng.gauss(0, 0.01),
                "objective/kl": 6 * (1 - math.exp(-step / 30)) + abs(rng.gauss(0, 0.05)),
                "kl/coef": 0.05,
                "kl/negative_fraction": max(0.45 - 0.01 * step, 0.05),
                "objective/entropy": 30 - 0.05 * step + rng.gauss(0, 0.3),
                "rollout/response_length": 20 + rng.gauss(0, 1),
                "rollout/eos_fraction": 0.9,
                "value/explained_variance": min(-0.3 + 0.05 * step, 0.8),
                "value/loss": 1.0 / step,
                "policy/loss": rng.gauss(0, 0.1),
            }
        )
    return rows


def perturbed(key: str, value: Callable[[int, float], float], start: int = 1, stop: int = 10**9) -> list[Row]:
    """The healthy stream with ``key`` replaced by ``value(step, old)`` for ``start <= step < stop``."""
    rows = healthy_stream()
    for row in rows:
        if start <= row["step"] < stop:
            row[key] = value(int(row["step"]), row.get(key, math.nan))
    return rows


def codes(warnings: list[HealthWarning]) -> list[str]:
    return [w.code for w in warnings]


def monitor() -> HealthMonitor:
    return HealthMonitor(max_new_tokens=MAX_NEW_TOKENS)


def test_healthy_stream_is_silent() -> None:
    assert check_history(healthy_stream(), monitor()) == []
    assert check_history(healthy_stream(seed=1), monitor()) == []


def test_missing_keys_are_tolerated() -> None:
    # A GRPO run (no value head) that logs only a few keys, plus bookkeeping and text fields.
    rows = [{"step": s, "objective/scores": 0.01 * s, "objective/kl": 1.0, "note": "text"} for s in range(60)]
    assert check_history(rows) == []
    assert check_history([{}, {"step": 3}]) == []


@pytest.mark.parametrize(
    ("code", "rows", "fire_step"),
    [
        # objective/kl above 10 from step 40: fires on the 5th consecutive step (patience 5).
        ("kl_high", perturbed("objective/kl", lambda s, v: 14.0, start=40), 44),
        ("kl_negative", perturbed("objective/kl", lambda s, v: -0.8, start=30), 34),
        ("kl_negative_fraction", perturbed("kl/negative_fraction", lambda s, v: 0.85, start=30), 34),
        # Entropy 30 * 0.8**s falls below a tenth of its first value (step 1) from step 12 (0.8**11 < 0.1),
        # so it fires on step 16.
        ("entropy_collapse", perturbed("objective/entropy", lambda s, v: 30 * 0.8**s), 16),
        ("length_collapse", perturbed("rollout/response_length", lambda s, v: 0.4, start=50), 54),
        ("length_at_max", perturbed("rollout/response_length", lambda s, v: 32.0, start=50), 54),
        ("length_at_max", perturbed("rollout/eos_fraction", lambda s, v: 0.01, start=50), 54),
        # Exactly constant reward: flat as soon as the 20-step window is full.
        ("reward_flat", perturbed("objective/scores", lambda s, v: 0.5), 20),
        ("reward_no_variance", perturbed("objective/scores_std", lambda s, v: 0.0, start=30), 34),
        # 95% of a GRPO step's groups all scored the same from step 30 (90% is still tolerated).
        ("groups_no_signal", perturbed("rollout/frac_reward_zero_std", lambda s, v: 0.95 if s >= 30 else 0.9), 34),
        # A noisy plateau: not flat (it moves), but the 20-step mean stops improving over 50 steps. It can
        # first be checked at step 70 (50 + 20 steps of history), then needs 5 steps of patience.
        ("reward_stalled", perturbed("objective/scores", lambda s, v: 0.5 + 0.05 * math.sin(1.7 * s)), 74),
        ("value_explained_variance", perturbed("value/explained_variance", lambda s, v: -0.2), 20),
        ("nonfinite", perturbed("policy/loss", lambda s, v: math.nan, start=7, stop=8), 7),
        ("nonfinite", perturbed("objective/kl", lambda s, v: math.inf, start=9, stop=10), 9),
    ],
)
def test_each_warning_fires_once_on_its_problem(code: str, rows: list[Row], fire_step: int | None) -> None:
    warnings = check_history(rows, monitor())
    assert codes(warnings) == [code]  # that problem, once, and nothing else
    warning = warnings[0]
    if fire_step is not None:
        assert warning.step == fire_step
    assert warning.message and warning.advice == ADVICE[code]


def test_conditions_need_patience_consecutive_steps() -> None:
    # 4 steps above 10 (patience 5) does not fire; neither do 4 + a break + 4.
    rows = perturbed("objective/kl", lambda s, v: 14.0 if s not in (44, 45) else 3.0, start=40, stop=49)
    assert check_history(rows, monitor()) == []
    # Explained variance below 0 for 19 steps is the normal start of a value head, not a warning.
    rows = perturbed("value/explained_variance", lambda s, v: -0.5, stop=20)
    assert check_history(rows, monitor()) == []


def test_warning_recurs_only_after_clearing() -> None:
    rows = perturbed("objective/kl", lambda s, v: 14.0 if s < 60 or s >= 80 else 3.0, start=40, stop=100)
    warnings = check_history(rows, monitor())
    assert [(w.code, w.step) for w in warnings] == [("kl_high", 44), ("kl_high", 84)]


def test_nonfinite_fires_immediately_and_names_the_key() -> None:
    health = HealthMonitor()
    assert health.update({"objective/kl": 1.0}, step=0) == []
    warnings = health.update({"objective/kl": 1.0, "value/loss": math.nan, "policy/loss": "Infinity"}, step=1)
    assert codes(warnings) == ["nonfinite"] and warnings[0].step == 1
    assert "value/loss=nan" in warnings[0].message and "policy/loss=inf" in warnings[0].message
    assert health.update({"value/loss": math.nan}, step=2) == []  # still bad: already reported
    assert health.update({"value/loss": 1.0}, step=3) == []
    assert codes(health.update({"value/loss": -math.inf}, step=4)) == ["nonfinite"]


def test_length_checks_need_their_evidence() -> None:
    # Without max_new_tokens and without eos_fraction, a long response length says nothing.
    rows = [{"step": s, "rollout/response_length": 32.0} for s in range(20)]
    assert check_history(rows, HealthMonitor()) == []
    assert codes(check_history(rows, HealthMonitor(max_new_tokens=32))) == ["length_at_max"]


def test_entropy_absolute_floor() -> None:
    rows = [{"step": s, "objective/entropy": 0.001} for s in range(10)]  # never higher, still collapsed
    assert codes(check_history(rows)) == ["entropy_collapse"]


def test_thresholds_are_constructor_arguments() -> None:
    rows = perturbed("objective/kl", lambda s, v: 8.0, start=40)
    assert codes(check_history(rows, HealthMonitor(max_new_tokens=MAX_NEW_TOKENS, max_kl=7.0))) == ["kl_high"]
    rows = perturbed("objective/kl", lambda s, v: 14.0, start=40)
    assert check_history(rows, HealthMonitor(max_new_tokens=MAX_NEW_TOKENS, patience=5))[0].step == 44
    assert check_history(rows, HealthMonitor(max_new_tokens=MAX_NEW_TOKENS, patience=2))[0].step == 41


def test_negative_kl_advice_points_at_generation_settings() -> None:
    for code in ("kl_negative", "kl_negative_fraction"):
        advice = ADVICE[code]
        assert "top_k=0" in advice and "top_p=1.0" in advice and "min_length" in advice
    assert "0..10" in ADVICE["kl_high"]


def test_health_warning_is_frozen_and_readable() -> None:
    warning = HealthWarning(code="kl_high", step=3, message="KL 12.", advice="Raise the KL coefficient.")
    with pytest.raises(dataclasses.FrozenInstanceError):
        warning.step = 4  # type: ignore[misc]
    assert str(warning) == "[health] step 3 kl_high: KL 12. Try: Raise the KL coefficient."
    assert set(HEALTH_CODES) == set(ADVICE)


def test_reward_stalled_once_per_plateau_despite_noise() -> None:
    # Plateau at 0.3 (noise 0.03), a rise from step 120 to 0.9, a second plateau: one warning per plateau,
    # and none while the reward is climbing.
    rng = random.Random(0)
    rows = healthy_stream(300)
    for row in rows:
        step = row["step"]
        level = 0.3 if step < 120 else min(0.3 + 0.01 * (step - 120), 0.9)
        row["objective/scores"] = level + rng.gauss(0, 0.03)
    warnings = check_history(rows, monitor())
    assert codes(warnings) == ["reward_stalled", "reward_stalled"]
    assert warnings[0].step == 74 and warnings[1].step > 180 + 20  # after the rise ends (step 180)


def test_clearing_needs_patience_too() -> None:
    # KL hovering at the threshold: above for 5, below for 2, above for 5 ... is one ongoing problem.
    rows = perturbed("objective/kl", lambda s, v: 14.0 if (s - 40) % 7 < 5 else 9.0, start=40)
    assert [(w.code, w.step) for w in check_history(rows, monitor())] == [("kl_high", 44)]


# -- reward hacking -------------------------------------------------------------------------------------------


def quality_stream(
    reward: Callable[[int], float],
    distinct: Callable[[int], float],
    kl_share: Callable[[int], float] = lambda s: 0.2,
    kl: float = 3.0,
    n: int = 40,
    seed: int = 0,
) -> list[Row]:
    """Reward, diversity and KL concentration as functions of the step, with a little batch noise."""
    rng = random.Random(seed)
    return [
        {
            "step": s,
            "objective/scores": reward(s) + rng.gauss(0, 0.01),
            "objective/scores_std": 0.3,
            "objective/kl": kl,
            "quality/distinct_1": distinct(s) + rng.gauss(0, 0.005),
            "kl/top5_token_share": kl_share(s),
        }
        for s in range(1, n + 1)
    ]


def rising(s: int) -> float:
    return 0.2 + 0.02 * s  # +0.6 over 30 steps: two within-batch stds


def hacking_codes(rows: list[Row], **kwargs) -> list[HealthWarning]:
    return [w for w in check_history(rows, HealthMonitor(**kwargs)) if w.code == "reward_hacking"]


def test_reward_hacking_fires_when_reward_rises_and_diversity_falls() -> None:
    # distinct-1 0.55 until step 15, then 0.42; baseline (steps 1-3) 0.55, so it is 0.13 below from step 16.
    # The reward's baseline is 0.24 (steps 1-3) and its last-5 mean at step s is 0.2 + 0.02 (s - 2): more than
    # 0.5 std (0.15) above from step 12. So the condition holds from step 16 and fires after patience 5, at 20.
    rows = quality_stream(rising, lambda s: 0.55 if s < 16 else 0.42)
    warnings = hacking_codes(rows)
    assert [w.step for w in warnings] == [20]
    assert re.search(r"quality/distinct_1 fell from 0\.5[45]\d* to 0\.4[12]\d*,", warnings[0].message)
    assert "kl.coef" in warnings[0].advice and "tether report" in warnings[0].advice
    assert "repetition" in warnings[0].advice


def test_reward_hacking_fires_when_the_kl_concentrates_on_a_few_tokens() -> None:
    rows = quality_stream(rising, lambda s: 0.55, kl_share=lambda s: 0.2 if s < 16 else 0.7)
    warnings = hacking_codes(rows)
    assert [w.step for w in warnings] == [20] and "kl/top5_token_share = 0.70" in warnings[0].message
    # the same concentration of a KL that is still near zero (noise) is not evidence
    assert hacking_codes(quality_stream(rising, lambda s: 0.55, kl_share=lambda s: 0.9, kl=0.2)) == []


def test_reward_hacking_is_quiet_on_healthy_learning_and_on_a_flat_reward() -> None:
    # reward rising with diversity steady (within the 0.05 tolerance) and the KL spread over many tokens
    assert hacking_codes(quality_stream(rising, lambda s: 0.55 - 0.001 * s)) == []
    # a flat reward with low (and falling) diversity: not hacking, nothing is being exploited
    assert hacking_codes(quality_stream(lambda s: 0.5, lambda s: 0.3 if s < 16 else 0.2)) == []
    # diversity falling while the reward rises by less than half a within-batch std
    assert hacking_codes(quality_stream(lambda s: 0.2 + 0.003 * s, lambda s: 0.3)) == []
    # and the existing streams, which log no quality metrics, are untouched
    assert check_history(healthy_stream(), monitor()) == []


def test_reward_hacking_against_a_reference_baseline() -> None:
    # The reference model's samples had distinct-1 0.62; the policy's 0.55 from step 1 is already 0.07 below.
    rows = quality_stream(rising, lambda s: 0.55)
    assert hacking_codes(rows) == []
    warnings = hacking_codes(rows, quality_baseline={"quality/distinct_1": 0.62})
    # the reward's rise is first clear at step 12 (see above), so it fires at 16
    assert [w.step for w in warnings] == [16] and "fell from 0.62 to 0.5" in warnings[0].message
