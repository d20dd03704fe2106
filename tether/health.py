"""Training-health warnings read off the per-step metrics, each with its likely cause and what to try.

The TRL training FAQ says to watch two numbers first: the mean reward (``objective/scores``), which should go
up, and the objective KL (``objective/kl``), which should stay roughly within 0..10 and never go negative.
:class:`HealthMonitor` watches those and the metrics that usually explain them (entropy, response length,
value-head fit) and turns a persistent problem into one :class:`HealthWarning`::

    monitor = HealthMonitor(max_new_tokens=cfg.sampling.max_new_tokens)
    for step ...:
        for warning in monitor.update(metrics, step):
            progress.write(str(warning))

A condition must hold for ``patience`` consecutive steps before it fires (one noisy step is not a problem),
fires once, and stays quiet until it has cleared (not held for ``patience`` consecutive steps) and comes back.
Non-finite metrics fire at once. A metric
that is absent from a step (a GRPO run has no ``value/*``) leaves its conditions as they were.
:func:`check_history` replays a whole ``metrics.jsonl`` stream, as ``tether report`` does.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tether.quality import BASELINE_STEPS

_FAQ = "the TRL training FAQ"

# Advice shared by the two negative-KL conditions (TRL FAQ, "What is the concern with negative KL divergence?").
_NEGATIVE_KL_ADVICE = (
    "With pure sampling from the policy the expected KL is >= 0, so a persistently negative value is a bug "
    "symptom, and since the reward is score - beta * KL the policy gets paid for pushing it further down "
    f"({_FAQ}). The usual cause is generation that is not pure sampling: use do_sample=True, top_k=0, "
    "top_p=1.0 and no min_length / min_new_tokens (EOS must be allowed), as the FAQ recommends. Also compute "
    "policy and reference logprobs from logits divided by the same temperature used for sampling, keep the "
    "reference model frozen, and make sure both logprob calls see the same padding and response mask."
)

#: Warning code -> advice (what to try), in words a TRL user knows.
ADVICE: dict[str, str] = {
    "nonfinite": (
        "The update diverged or the reward returned a non-finite score. Look for NaN/inf scores in "
        "samples.jsonl, lower the learning rate, enable gradient clipping (max_grad_norm), prefer bf16 or fp32 "
        "over fp16, and look for divisions by ~0 (e.g. whitening advantages over fewer than 2 tokens). Resume "
        "from the last checkpoint whose metrics were finite."
    ),
    "kl_high": (
        f"The policy is drifting far from the reference model; {_FAQ} recommends keeping objective KL within "
        "about 0..10. Read the latest generations for reward hacking (repeated tokens, exclamation marks, "
        "emoji, text that is no longer language). Try a larger KL coefficient (init_kl_coef / beta), an "
        "adaptive KL controller with a lower target, a lower learning rate, or fewer PPO epochs per batch."
    ),
    "kl_negative": _NEGATIVE_KL_ADVICE,
    "kl_negative_fraction": _NEGATIVE_KL_ADVICE,
    "entropy_collapse": (
        "The policy has become nearly deterministic, so it no longer explores; this often goes with mode "
        "collapse or reward hacking. Read the generations. Try a larger KL coefficient (it pulls the policy "
        "back towards the reference model's entropy), a lower learning rate, fewer PPO epochs or a smaller clip "
        "range, and check the reward does not pay for one fixed string."
    ),
    "length_collapse": (
        "Responses are (nearly) empty. The policy may have found that stopping at once pays: the KL penalty is "
        "summed over response tokens, so a large KL coefficient makes short answers cheap, and some rewards "
        f"score empty text well. Read the generations ({_FAQ}: bad settings can cut generations too early) and "
        "check that prompts do not already end with EOS, that pad_token == eos_token does not strip responses, "
        "and that the reward gives an empty response a low score. Try a lower KL coefficient or learning rate."
    ),
    "length_at_max": (
        "Almost every response runs to max_new_tokens without emitting EOS. Either the model rambles (often "
        "reward hacking when longer text scores higher) or EOS cannot be produced: check the tokenizer's "
        "eos_token_id is the one generation stops on and that nothing suppresses it (no min_length, as the FAQ "
        "says). Try a penalty for responses without EOS (TRL's missing_eos_penalty), a length-normalised reward, "
        "or a larger max_new_tokens if long answers are legitimate. Ignore this if your task deliberately "
        "generates fixed-length responses."
    ),
    "reward_flat": (
        f"Check the reward itself ({_FAQ}): score a few extreme cases by hand (e.g. a clearly positive and a "
        "clearly negative text for a sentiment reward) and confirm they differ; make sure it is not constant, "
        "clipped or saturated; if it is dominated by the prompt, which the policy cannot change, normalise it, "
        "e.g. reward(prompt + response) - reward(prompt). Read the generations for post-processing bugs. If the "
        "reward is already at its best possible value, training has converged."
    ),
    "reward_no_variance": (
        "All responses in a batch get the same score, so every advantage is ~0 and the policy gets no learning "
        "signal (GRPO's group-normalised advantages are exactly zero). Check the reward distinguishes "
        "responses; if the prompts are all too hard or all too easy (every score 0 or every score 1), change "
        "the prompt mix, sample more completions per prompt, or give partial credit."
    ),
    "groups_no_signal": (
        "Most prompts' completions all score the same (all right or all wrong), so under a group baseline "
        "(GRPO, RLOO) their advantages are exactly zero and only the remaining groups teach the policy. If the "
        "scores are all at the top the task is solved or too easy; at the bottom it is too hard for the policy "
        "as it is. Change the prompt mix (filter solved and hopeless prompts), sample more completions per "
        "prompt (num_generations), raise the sampling temperature, or give partial credit in the reward."
    ),
    "reward_stalled": (
        "If the reward is near the best achievable, training is done. Otherwise check objective/kl and "
        "kl/coef: a KL coefficient that is too large holds the policy at the reference, so try a lower one or a "
        f"larger learning rate. Make sure the response can actually move the reward; {_FAQ} suggests starting "
        "from a working example, changing one thing at a time, and keeping in mind that a small model may lack "
        "the capacity for the task."
    ),
    "reward_hacking": (
        "Likely reward hacking: the policy has found tokens or patterns the reward pays for that are not better "
        f"text, and the KL penalty is not holding it back ({_FAQ}: optimising the reward alone exploits it). "
        "Read the samples (`tether report RUN_DIR`): the 'KL by token' table names the token types the KL is "
        'paying for and each sample\'s high_kl_tokens marks them in the response; a few words ("love", '
        '"!") at the top of that list while the reward climbs is the pattern. Try a larger KL coefficient '
        "(kl.coef) or an adaptive KL controller with a target (kl.target), a reward that penalises repetition "
        "(subtract a repeated n-gram share, cap the count of a word), or a lower learning rate or fewer steps. "
        "Ignore it if the task really asks for a narrow vocabulary (a fixed answer format)."
    ),
    "value_explained_variance": (
        "The value head predicts returns worse than a constant, so GAE advantages are mostly noise. Early in "
        "training this is normal; for this long it is not. Give the value head more learning (vf_coef, its "
        "learning rate, more PPO epochs), loosen the value clip range (cliprange_value), normalise or whiten "
        "rewards if their scale is large, and check the value loss uses the same response mask as the rewards."
    ),
}

#: Every code :class:`HealthMonitor` can emit.
HEALTH_CODES: tuple[str, ...] = tuple(ADVICE)


@dataclass(frozen=True)
class HealthWarning:
    """One training-health problem: what was seen (``message``) and what to try (``advice``).

    Attributes:
        code: a stable identifier from ``HEALTH_CODES`` (e.g. ``"kl_high"``), for filtering and tests.
        step: the optimisation step at which the condition had held long enough to fire.
        message: what the metrics show, with the numbers.
        advice: the likely causes and what to try.
    """

    code: str
    step: int
    message: str
    advice: str

    def __str__(self) -> str:
        return f"[health] step {self.step} {self.code}: {self.message} Try: {self.advice}"


class _Missing:
    """A check's answer when its metric is absent this step: leave the condition's state unchanged."""


_MISSING = _Missing()
# What the reward-hacking check averages over the first steps as its baseline.
_BASELINE_KEYS = ("objective/scores", "objective/scores_std", "quality/distinct_1")
# A check returns None (condition does not hold), a message (it holds), or _MISSING (cannot tell this step).
_CheckResult = str | None | _Missing


@dataclass
class _State:
    held_for: int = 0  # consecutive steps the condition has held
    clear_for: int = 0  # consecutive steps it has not, since it fired
    fired: bool = False


class HealthMonitor:
    """Watches per-step metrics and returns a :class:`HealthWarning` when a problem persists.

    Args:
        patience: consecutive steps a condition must hold before it fires (non-finite values fire at once).
        max_new_tokens: the generation length limit; enables the "length pinned at the maximum" check from
            ``rollout/response_length`` (``rollout/eos_fraction`` is used whether or not this is given).
        max_kl: ``objective/kl`` above this is too far from the reference (the FAQ's 0..10 range).
        min_kl: ``objective/kl`` below this is negative KL. Slightly below 0 rather than 0 because a
            batch-mean estimate is noisy while the policy is still close to the reference.
        max_negative_kl_fraction: ``kl/negative_fraction`` above this fires. With pure sampling fewer than
            half the sequences should have a negative KL estimate (close to half only while the policy still
            equals the reference), so the default leaves a margin above 0.5.
        entropy_collapse_ratio: ``objective/entropy`` below this fraction of its first logged value fires.
        min_entropy: ``objective/entropy`` below this (nats) fires whatever its first value was.
        min_response_length: ``rollout/response_length`` (mean tokens) below this is a collapse to empty.
        length_pinned_ratio: mean length at or above this fraction of ``max_new_tokens`` is pinned at the max.
        min_eos_fraction: ``rollout/eos_fraction`` below this means almost no response ends with EOS.
        reward_window: steps of ``objective/scores`` over which the flat/stalled checks look.
        reward_flat_rtol: the reward is flat when its std over the window is at most this times its mean's
            magnitude (a floor of 1e-8 catches an exactly constant zero reward).
        min_scores_std: ``objective/scores_std`` (spread within a batch) at or below this means every
            response got the same score.
        reward_stall_steps: the reward has stalled when the mean of the last ``reward_window`` steps is not
            above the mean of the window that ended this many steps earlier by more than one standard error
            of that difference (noise) and more than ``min_reward_improvement``.
        min_reward_improvement: see ``reward_stall_steps``.
        explained_variance_patience: consecutive steps of ``value/explained_variance < 0`` before it fires;
            longer than ``patience`` because a fresh value head starts worse than a constant.
        quality_baseline_steps: the first this many steps fed to the monitor are the baseline of the
            reward-hacking check (mean ``objective/scores``, its within-batch std, ``quality/distinct_1``).
        quality_baseline: the baseline ``quality/distinct_1`` (and other ``quality/*``) from samples of the
            reference model (:func:`tether.quality.texts_quality`), instead of the first steps' value.
        hacking_window: steps over which the reward is averaged to decide that it has risen.
        hacking_reward_rise: the reward has risen when that average is above the baseline reward by more than
            this many baseline within-batch stds (``objective/scores_std``): scale-free, and clear of the
            noise of a batch mean.
        max_distinct_drop: ``quality/distinct_1`` more than this below its baseline is a loss of diversity.
        max_kl_top5_share: ``kl/top5_token_share`` above this means the KL concentrates on a few token types.
        hacking_min_kl: the concentration counts only with ``objective/kl`` at least this (nats per sequence):
            a near-zero KL is noise, however it splits over tokens.
    """

    def __init__(
        self,
        patience: int = 5,
        *,
        max_new_tokens: int | None = None,
        max_kl: float = 10.0,
        max_zero_std_fraction: float = 0.9,
        min_kl: float = -0.05,
        max_negative_kl_fraction: float = 0.6,
        entropy_collapse_ratio: float = 0.1,
        min_entropy: float = 1e-2,
        min_response_length: float = 1.5,
        length_pinned_ratio: float = 0.98,
        min_eos_fraction: float = 0.05,
        reward_window: int = 20,
        reward_flat_rtol: float = 1e-3,
        min_scores_std: float = 1e-6,
        reward_stall_steps: int = 50,
        min_reward_improvement: float = 0.0,
        explained_variance_patience: int = 20,
        quality_baseline_steps: int = BASELINE_STEPS,
        quality_baseline: Mapping[str, float] | None = None,
        hacking_window: int = 5,
        hacking_reward_rise: float = 0.5,
        max_distinct_drop: float = 0.05,
        max_kl_top5_share: float = 0.5,
        hacking_min_kl: float = 1.0,
    ) -> None:
        if patience < 1 or explained_variance_patience < 1:
            raise ValueError("patience values must be >= 1")
        if reward_window < 2 or reward_stall_steps < 1:
            raise ValueError("reward_window must be >= 2 and reward_stall_steps >= 1")
        if quality_baseline_steps < 1 or hacking_window < 1:
            raise ValueError("quality_baseline_steps and hacking_window must be >= 1")
        self.patience = patience
        self.max_new_tokens = max_new_tokens
        self.max_kl = max_kl
        self.max_zero_std_fraction = max_zero_std_fraction
        self.min_kl = min_kl
        self.max_negative_kl_fraction = max_negative_kl_fraction
        self.entropy_collapse_ratio = entropy_collapse_ratio
        self.min_entropy = min_entropy
        self.min_response_length = min_response_length
        self.length_pinned_ratio = length_pinned_ratio
        self.min_eos_fraction = min_eos_fraction
        self.reward_window = reward_window
        self.reward_flat_rtol = reward_flat_rtol
        self.min_scores_std = min_scores_std
        self.reward_stall_steps = reward_stall_steps
        self.min_reward_improvement = min_reward_improvement
        self.explained_variance_patience = explained_variance_patience
        self.quality_baseline_steps = quality_baseline_steps
        self.quality_baseline = dict(quality_baseline or {})
        self.hacking_window = hacking_window
        self.hacking_reward_rise = hacking_reward_rise
        self.max_distinct_drop = max_distinct_drop
        self.max_kl_top5_share = max_kl_top5_share
        self.hacking_min_kl = hacking_min_kl
        # the first quality_baseline_steps steps' values of _BASELINE_KEYS (those present)
        self._baseline_rows: list[dict[str, float]] = []
        self._recent_scores: deque[float] = deque(maxlen=hacking_window)
        self._n_scores = 0

        self._initial_entropy: float | None = None
        self._rewards: deque[float] = deque(maxlen=reward_stall_steps + reward_window)
        self._states: dict[str, _State] = {code: _State() for code in HEALTH_CODES}
        # (code, check, patience) in the order warnings are reported within one step.
        self._checks: list[tuple[str, Callable[[dict[str, float]], _CheckResult], int]] = [
            ("nonfinite", self._check_nonfinite, 1),
            ("kl_high", self._check_kl_high, patience),
            ("kl_negative", self._check_kl_negative, patience),
            ("kl_negative_fraction", self._check_negative_fraction, patience),
            ("entropy_collapse", self._check_entropy, patience),
            ("length_collapse", self._check_length_collapse, patience),
            ("length_at_max", self._check_length_at_max, patience),
            # The window already spans reward_window steps, so one step of "flat" is enough evidence.
            ("reward_flat", self._check_reward_flat, 1),
            ("reward_no_variance", self._check_scores_std, patience),
            ("groups_no_signal", self._check_zero_std_groups, patience),
            ("reward_stalled", self._check_reward_stalled, patience),
            ("reward_hacking", self._check_reward_hacking, patience),
            ("value_explained_variance", self._check_explained_variance, explained_variance_patience),
        ]

    def update(self, metrics: Mapping[str, Any], step: int) -> list[HealthWarning]:
        """Feed one step's metrics; return the warnings that fire at this step (usually none)."""
        values = _numeric(metrics)
        scores = values.get("objective/scores")
        if scores is not None and math.isfinite(scores):
            self._rewards.append(scores)
            self._recent_scores.append(scores)
            self._n_scores += 1
        if "objective/scores" in values and len(self._baseline_rows) < self.quality_baseline_steps:
            self._baseline_rows.append({k: values[k] for k in _BASELINE_KEYS if k in values})
        entropy = values.get("objective/entropy")
        if self._initial_entropy is None and entropy is not None and math.isfinite(entropy):
            self._initial_entropy = entropy

        warnings: list[HealthWarning] = []
        for code, check, patience in self._checks:
            result = check(values)
            if isinstance(result, _Missing):
                continue
            state = self._states[code]
            if result is None:
                state.held_for = 0
                if state.fired:
                    # A fired condition counts as cleared only after `patience` good steps in a row, so a metric
                    # hovering at a threshold does not repeat the same warning every few steps.
                    state.clear_for += 1
                    state.fired = state.clear_for < patience
                continue
            state.clear_for = 0
            state.held_for += 1
            if state.held_for >= patience and not state.fired:
                state.fired = True
                warnings.append(HealthWarning(code=code, step=step, message=result, advice=ADVICE[code]))
        return warnings

    # -- the checks: each returns None (fine), a message (problem) or _MISSING (metric absent) --------------

    def _for(self, count: int) -> str:
        return f"for {count} consecutive steps" if count > 1 else "at this step"

    def _check_nonfinite(self, m: dict[str, float]) -> _CheckResult:
        bad = sorted(key for key, value in m.items() if not math.isfinite(value))
        if not bad:
            return None
        shown = ", ".join(f"{key}={m[key]}" for key in bad[:6]) + (" ..." if len(bad) > 6 else "")
        return f"Non-finite metric values: {shown}."

    def _check_kl_high(self, m: dict[str, float]) -> _CheckResult:
        kl = m.get("objective/kl")
        if kl is None or not math.isfinite(kl):
            return _MISSING
        if kl <= self.max_kl:
            return None
        return f"objective/kl = {kl:.4g} has been above {self.max_kl:g} {self._for(self.patience)}."

    def _check_kl_negative(self, m: dict[str, float]) -> _CheckResult:
        kl = m.get("objective/kl")
        if kl is None or not math.isfinite(kl):
            return _MISSING
        if kl >= self.min_kl:
            return None
        return (
            f"objective/kl = {kl:.4g} has been negative (below {self.min_kl:g}) {self._for(self.patience)}."
        )

    def _check_negative_fraction(self, m: dict[str, float]) -> _CheckResult:
        fraction = m.get("kl/negative_fraction")
        if fraction is None or not math.isfinite(fraction):
            return _MISSING
        if fraction <= self.max_negative_kl_fraction:
            return None
        return (
            f"kl/negative_fraction = {fraction:.3g}: most sequences have a negative KL estimate, above "
            f"{self.max_negative_kl_fraction:g} {self._for(self.patience)}."
        )

    def _check_entropy(self, m: dict[str, float]) -> _CheckResult:
        entropy = m.get("objective/entropy")
        if entropy is None or not math.isfinite(entropy):
            return _MISSING
        initial = self._initial_entropy
        relative = initial is not None and initial > 0 and entropy < self.entropy_collapse_ratio * initial
        if not (relative or entropy < self.min_entropy):
            return None
        start = f" (it started at {initial:.4g})" if initial is not None else ""
        return f"objective/entropy = {entropy:.4g}{start} has collapsed {self._for(self.patience)}."

    def _check_length_collapse(self, m: dict[str, float]) -> _CheckResult:
        length = m.get("rollout/response_length")
        if length is None or not math.isfinite(length):
            return _MISSING
        if length >= self.min_response_length:
            return None
        return (
            f"rollout/response_length = {length:.3g} tokens on average (below {self.min_response_length:g}) "
            f"{self._for(self.patience)}."
        )

    def _check_length_at_max(self, m: dict[str, float]) -> _CheckResult:
        length = m.get("rollout/response_length")
        eos = m.get("rollout/eos_fraction")
        evidence: list[str] = []
        known = False
        if length is not None and math.isfinite(length) and self.max_new_tokens:
            known = True
            if length >= self.length_pinned_ratio * self.max_new_tokens:
                evidence.append(
                    f"rollout/response_length = {length:.4g} of max_new_tokens = {self.max_new_tokens}"
                )
        if eos is not None and math.isfinite(eos):
            known = True
            if eos < self.min_eos_fraction:
                evidence.append(f"rollout/eos_fraction = {eos:.3g} (below {self.min_eos_fraction:g})")
        if not known:
            return _MISSING
        if not evidence:
            return None
        return f"Responses are pinned at the length limit: {'; '.join(evidence)}, {self._for(self.patience)}."

    def _window_stats(self) -> tuple[float, float] | None:
        if len(self._rewards) < self.reward_window:
            return None
        window = list(self._rewards)[-self.reward_window :]
        return statistics.fmean(window), statistics.pstdev(window)

    def _check_reward_flat(self, m: dict[str, float]) -> _CheckResult:
        if "objective/scores" not in m:
            return _MISSING
        stats = self._window_stats()
        if stats is None:
            return None
        mean, std = stats
        if std > self.reward_flat_rtol * max(abs(mean), 1e-8):
            return None
        return (
            f"objective/scores has been flat over the last {self.reward_window} steps "
            f"(mean {mean:.4g}, std {std:.3g})."
        )

    def _check_scores_std(self, m: dict[str, float]) -> _CheckResult:
        spread = m.get("objective/scores_std")
        if spread is None or not math.isfinite(spread):
            return _MISSING
        if spread > self.min_scores_std:
            return None
        return (
            f"objective/scores_std = {spread:.3g}: every response scored the same {self._for(self.patience)}."
        )

    def _check_zero_std_groups(self, m: dict[str, float]) -> _CheckResult:
        fraction = m.get("rollout/frac_reward_zero_std")
        if fraction is None or not math.isfinite(fraction):
            return _MISSING
        if fraction <= self.max_zero_std_fraction:
            return None
        return (
            f"rollout/frac_reward_zero_std = {fraction:.2f}: more than {self.max_zero_std_fraction:.0%} of the "
            f"groups carry no learning signal {self._for(self.patience)}."
        )

    def _check_reward_stalled(self, m: dict[str, float]) -> _CheckResult:
        if "objective/scores" not in m:
            return _MISSING
        if len(self._rewards) < self.reward_stall_steps + self.reward_window:
            return None
        if self._states["reward_flat"].held_for > 0:  # already reported as flat; one warning is enough
            return None
        history = list(self._rewards)
        recent, earlier = history[-self.reward_window :], history[: self.reward_window]
        now, before = statistics.fmean(recent), statistics.fmean(earlier)
        # An improvement within one standard error of the difference of the two window means is noise, not
        # progress. Once reported, only a clear rise (3 standard errors) ends the stall: on a noisy plateau
        # the windows drift above one standard error now and then, which would repeat the warning.
        stderr = math.sqrt(
            (statistics.pvariance(recent) + statistics.pvariance(earlier)) / self.reward_window
        )
        needed = stderr * (3.0 if self._states["reward_stalled"].fired else 1.0)
        if now - before > max(self.min_reward_improvement, needed):
            return None
        return (
            f"objective/scores has not improved in {self.reward_stall_steps} steps: mean over the last "
            f"{self.reward_window} steps {now:.4g} vs {before:.4g} {self.reward_stall_steps} steps earlier."
        )

    def _baseline(self, key: str) -> float | None:
        """The mean of ``key`` over the baseline steps (None before they are all seen, or when absent)."""
        if key in self.quality_baseline:
            return self.quality_baseline[key]
        if len(self._baseline_rows) < self.quality_baseline_steps:
            return None
        values = [row[key] for row in self._baseline_rows if key in row and math.isfinite(row[key])]
        return statistics.fmean(values) if values else None

    def _check_reward_hacking(self, m: dict[str, float]) -> _CheckResult:
        distinct, share = m.get("quality/distinct_1"), m.get("kl/top5_token_share")
        if "objective/scores" not in m or (distinct is None and share is None):
            return _MISSING
        # Rising: the mean of the last hacking_window steps, all after the baseline, vs the baseline's mean.
        base_reward = self._baseline("objective/scores")
        if base_reward is None or self._n_scores < self.quality_baseline_steps + self.hacking_window:
            return None
        now = statistics.fmean(self._recent_scores)
        spread = self._baseline("objective/scores_std") or 0.0
        if not now - base_reward > self.hacking_reward_rise * spread:
            return None
        evidence: list[str] = []
        base_distinct = self._baseline("quality/distinct_1")
        if (
            distinct is not None
            and base_distinct is not None
            and distinct < base_distinct - self.max_distinct_drop
        ):
            evidence.append(f"quality/distinct_1 fell from {base_distinct:.3g} to {distinct:.3g}")
        kl = m.get("objective/kl")
        if (
            share is not None
            and share > self.max_kl_top5_share
            and kl is not None
            and kl >= self.hacking_min_kl
        ):
            evidence.append(
                f"kl/top5_token_share = {share:.2f}: five token types carry most of the KL ({kl:.3g} nats)"
            )
        if not evidence:
            return None
        return (
            f"objective/scores rose from {base_reward:.4g} (baseline) to {now:.4g} (mean of the last "
            f"{self.hacking_window} steps) while {' and '.join(evidence)}, {self._for(self.patience)}."
        )

    def _check_explained_variance(self, m: dict[str, float]) -> _CheckResult:
        ev = m.get("value/explained_variance")
        if ev is None or not math.isfinite(ev):
            return _MISSING
        if ev >= 0:
            return None
        count = self.explained_variance_patience
        return f"value/explained_variance = {ev:.3g} has been below 0 {self._for(count)}."


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics as floats; bookkeeping keys, text, ``None`` and booleans are dropped."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key in ("step", "episode", "time") or value is None or isinstance(value, bool):
            continue
        try:
            out[key] = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):  # a str that is not "NaN"/"Infinity"/a number
            continue
    return out


def check_history(
    rows: Sequence[Mapping[str, Any]], monitor: HealthMonitor | None = None
) -> list[HealthWarning]:
    """Replay a metrics stream (e.g. ``metrics.jsonl`` rows) through a monitor; return every warning fired.

    Each row's ``"step"`` is used when present, else its index. ``monitor`` defaults to ``HealthMonitor()``;
    pass one to change thresholds (it is consumed: its state reflects the whole history afterwards).
    """
    monitor = monitor or HealthMonitor()
    warnings: list[HealthWarning] = []
    for index, row in enumerate(rows):
        step = row.get("step", index)
        warnings.extend(monitor.update(row, int(step) if isinstance(step, (int, float)) else index))
    return warnings
