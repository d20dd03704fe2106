"""``tether check-reward``: look at a reward before spending GPU hours optimising it.

The checks are the TRL training FAQ's advice for a reward that does not improve, made into numbers:

1. **Easy cases**: pairs where one answer is plainly better must be scored in that order.
2. **Score distribution**: mean, std, quantiles and a histogram (a constant reward teaches nothing).
3. **Length bias**: the correlation of the score with the response length; ``|r| > 0.5`` means the policy
   can raise its reward by writing longer (or shorter) answers instead of better ones.
4. **Prompt dominance**: how much of the score the prompt alone explains — the R² of the score against the
   score of the prompt with an empty response, and, when prompts repeat, the share of score variance that lies
   *between* prompts (epsilon squared, corrected for the upward bias of small groups). The policy cannot
   change its prompt, so that part is noise to it; the FAQ's fix is ``reward_baseline = "prompt"``, which
   scores ``r(prompt + response) - r(prompt)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tether.data import DataError
from tether.rewards.base import RewardError
from tether.rewards.compose import Reward, build_reward
from tether.rewards.data import load_samples, read_rows

LENGTH_CORRELATION_LIMIT = 0.5
PROMPT_SHARE_LIMIT = 0.5
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
PAIR_SEPARATOR = "|||"


# --- statistics (pure) --------------------------------------------------------------------------------------


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two [N] tensors; 0.0 when either is constant (nothing co-varies)."""
    if x.shape != y.shape or x.numel() < 2:
        raise ValueError(
            f"pearson needs two [N] tensors with N >= 2, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    dx, dy = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = math.sqrt((dx * dx).sum().item() * (dy * dy).sum().item())
    return 0.0 if denominator == 0.0 else (dx * dy).sum().item() / denominator


def between_group_share(scores: torch.Tensor, groups: Sequence[str]) -> float | None:
    """Share of the variance of [N] ``scores`` explained by ``groups`` (here: the prompt), epsilon squared.

    ``(SS_between - (k - 1) * MS_within) / SS_total`` with k groups and ``MS_within = SS_within / (N - k)``.
    Plain eta squared (``SS_between / SS_total``) is biased upwards: with two samples per prompt and a reward
    that ignores the prompt it is about 0.5 on average. None when no prompt repeats (N == k, nothing to split);
    0.0 for constant scores. May be slightly negative when prompts explain nothing.
    """
    n = scores.numel()
    if len(groups) != n:
        raise ValueError(f"got {len(groups)} groups for {n} scores")
    index: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        index.setdefault(group, []).append(i)
    k = len(index)
    if n <= k:
        return None
    values = scores.double()
    grand = values.mean()
    ss_total = ((values - grand) ** 2).sum().item()
    if ss_total == 0.0:
        return 0.0
    ss_between = sum(len(rows) * (values[rows].mean() - grand).item() ** 2 for rows in index.values())
    ms_within = (ss_total - ss_between) / (n - k)
    return (ss_between - (k - 1) * ms_within) / ss_total


# --- the report ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairCheck:
    """One easy case: the better answer must score higher."""

    prompt: str
    better: str
    worse: str
    better_score: float
    worse_score: float
    ordered: bool


@dataclass(frozen=True)
class Distribution:
    """Summary of the scores of N (prompt, response) samples; ``quantiles`` maps "p05" etc. to values."""

    count: int
    mean: float
    std: float
    quantiles: dict[str, float]


@dataclass(frozen=True)
class CheckReport:
    """Everything ``check_reward`` found; ``warnings`` is empty when nothing looks wrong."""

    pairs: list[PairCheck]
    pair_accuracy: float | None
    distribution: Distribution | None
    length_correlation: float | None
    prompt_r2: float | None
    prompt_share: float | None
    warnings: list[str]
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``check_reward.json`` holds)."""
        return asdict(self)


def _quantile_name(q: float) -> str:
    return {0.0: "min", 1.0: "max"}.get(q, f"p{round(q * 100):02d}")


def distribution(scores: torch.Tensor) -> Distribution:
    """Mean, unbiased std and quantiles of [N] scores."""
    values = scores.double()
    std = values.std().item() if values.numel() > 1 else 0.0
    qs = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return Distribution(
        count=values.numel(),
        mean=values.mean().item(),
        std=std,
        quantiles={_quantile_name(q): v for q, v in zip(QUANTILES, qs, strict=True)},
    )


def check_reward(
    reward: Reward,
    *,
    pairs: Sequence[tuple[str, str, str]] | None = None,
    prompts: Sequence[str] | None = None,
    responses: Sequence[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    columns: Mapping[str, Sequence[Any]] | None = None,
) -> CheckReport:
    """Run the checks of the module docstring.

    Args:
        reward: the reward as RL will use it (its weights and baseline included).
        pairs: (prompt, better, worse) easy cases.
        prompts, responses: [N] samples, ideally from the policy RL starts from, for checks 2-4.
        out_dir: where to write ``check_reward.json`` and the PNG plots (nothing is written when None).
        columns: extra [N] columns passed to reward functions with the samples.
    """
    warnings: list[str] = []
    pair_checks: list[PairCheck] = []
    if pairs:
        flat_prompts = [p for p, _, _ in pairs for _ in (0, 1)]
        flat_responses = [r for _, better, worse in pairs for r in (better, worse)]
        scores = reward(flat_prompts, flat_responses).scores.tolist()
        for i, (prompt, better, worse) in enumerate(pairs):
            good, bad = scores[2 * i], scores[2 * i + 1]
            pair_checks.append(PairCheck(prompt, better, worse, good, bad, good > bad))
        wrong = [i for i, p in enumerate(pair_checks) if not p.ordered]
        if wrong:
            warnings.append(
                f"{len(wrong)} of {len(pair_checks)} easy pairs are scored the wrong way round (rows "
                f"{', '.join(map(str, wrong[:10]))}): check the reward on plain cases before training on it"
            )
    pair_accuracy = sum(p.ordered for p in pair_checks) / len(pair_checks) if pair_checks else None

    dist = length_r = prompt_r2 = prompt_share = None
    sample_scores = prompt_scores = None
    if prompts is not None or responses is not None:
        if prompts is None or responses is None or len(prompts) != len(responses):
            raise RewardError("the distribution checks need as many prompts as responses")
        if len(prompts) < 3:
            raise RewardError(f"the distribution checks need at least 3 samples, got {len(prompts)}")
        prompts, responses = list(prompts), list(responses)
        sample_scores = reward(prompts, responses, columns).scores
        prompt_scores = reward(prompts, [""] * len(prompts), columns).scores
        dist = distribution(sample_scores)
        if dist.std == 0.0:
            warnings.append("every sample gets the same score: the reward gives no learning signal")
        lengths = torch.tensor([len(r) for r in responses], dtype=torch.float64)
        length_r = pearson(sample_scores, lengths)
        if abs(length_r) > LENGTH_CORRELATION_LIMIT:
            direction = "longer" if length_r > 0 else "shorter"
            warnings.append(
                f"score correlates with response length (r = {length_r:+.2f}): the policy can gain reward by "
                f"writing {direction} answers; add length-controlled pairs to the reward model's data or a length "
                "penalty, and watch rollout/response_length during training"
            )
        prompt_r2 = pearson(sample_scores, prompt_scores) ** 2
        prompt_share = between_group_share(sample_scores, prompts)
        worst = max(prompt_r2, prompt_share if prompt_share is not None else -math.inf)
        if worst > PROMPT_SHARE_LIMIT:
            warnings.append(
                f"the prompt alone explains {worst:.0%} of the score variance (R^2 vs prompt-only score "
                f"{prompt_r2:.2f}"
                + (f", between-prompt share {prompt_share:.2f}" if prompt_share is not None else "")
                + '): the policy cannot change its prompt; use reward_baseline = "prompt" to score '
                "r(prompt + response) - r(prompt)"
            )

    files: list[str] = []
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        if sample_scores is not None and prompt_scores is not None and responses is not None:
            files.extend(
                _plots(sample_scores, prompt_scores, [len(r) for r in responses], os.fspath(out_dir))
            )
        files.append(os.path.join(out_dir, "check_reward.json"))
    report = CheckReport(pair_checks, pair_accuracy, dist, length_r, prompt_r2, prompt_share, warnings, files)
    if out_dir is not None:
        with open(files[-1], "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
    return report


def _plots(scores: torch.Tensor, prompt_scores: torch.Tensor, lengths: list[int], out_dir: str) -> list[str]:
    # The object API needs no GUI backend (no pyplot global state), so this works on a headless server.
    from matplotlib.figure import Figure

    paths = []
    specs = [
        ("score_histogram.png", "score distribution", "score", "count"),
        ("score_vs_length.png", "score vs response length", "response length (characters)", "score"),
        (
            "score_vs_prompt_score.png",
            "score vs score of the prompt alone",
            "r(prompt)",
            "r(prompt + response)",
        ),
    ]
    for name, title, xlabel, ylabel in specs:
        fig = Figure(figsize=(5, 3.5), layout="tight")
        ax = fig.subplots()
        if name == "score_histogram.png":
            ax.hist(scores.tolist(), bins=min(50, max(10, scores.numel() // 5)))
        elif name == "score_vs_length.png":
            ax.scatter(lengths, scores.tolist(), s=8, alpha=0.6)
        else:
            ax.scatter(prompt_scores.tolist(), scores.tolist(), s=8, alpha=0.6)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


def format_report(report: CheckReport) -> str:
    """A readable plain-text table of the report."""
    lines: list[str] = []
    if report.pairs:
        lines.append(f"easy pairs: {sum(p.ordered for p in report.pairs)}/{len(report.pairs)} ordered right")
        lines.append(f"  {'#':>3}  {'better':>9}  {'worse':>9}  ok  prompt")
        for i, p in enumerate(report.pairs):
            prompt = p.prompt if len(p.prompt) <= 40 else p.prompt[:37] + "..."
            lines.append(
                f"  {i:>3}  {p.better_score:>9.4f}  {p.worse_score:>9.4f}  {'yes' if p.ordered else 'NO '} {prompt!r}"
            )
    if report.distribution is not None:
        d = report.distribution
        lines.append(f"scores of {d.count} samples: mean {d.mean:.4f}  std {d.std:.4f}")
        lines.append("  " + "  ".join(f"{k} {v:.4f}" for k, v in d.quantiles.items()))
        lines.append(f"correlation with response length: {report.length_correlation:+.3f}")
        share = "n/a (no repeated prompts)" if report.prompt_share is None else f"{report.prompt_share:.3f}"
        lines.append(f"prompt alone: R^2 {report.prompt_r2:.3f}; between-prompt variance share {share}")
    lines.append("warnings:" if report.warnings else "no warnings")
    lines.extend(f"  - {w}" for w in report.warnings)
    if report.files:
        lines.append("wrote " + ", ".join(report.files))
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------------------


def load_pairs(path: str) -> list[tuple[str, str, str]]:
    """(prompt, better, worse) rows from a JSONL/CSV/Parquet file; errors name the file and row."""
    rows, name = read_rows(path)
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in ("prompt", "better", "worse") if c not in row]
        if missing:
            raise DataError(f"{name}, row {i}: missing column(s) {', '.join(map(repr, missing))}")
        values = (row["prompt"], row["better"], row["worse"])
        if not all(isinstance(v, str) for v in values):
            raise DataError(f"{name}, row {i}: prompt, better and worse must be strings")
        out.append(values)
    return out


def parse_pair(text: str) -> tuple[str, str, str]:
    """``"prompt|||better|||worse"`` -> (prompt, better, worse)."""
    parts = text.split(PAIR_SEPARATOR)
    if len(parts) != 3:
        raise DataError(f"--pair {text!r} must be 'prompt{PAIR_SEPARATOR}better{PAIR_SEPARATOR}worse'")
    return parts[0], parts[1], parts[2]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether check-reward", description="Check a reward on easy pairs and on samples before RL."
    )
    parser.add_argument(
        "--reward",
        action="append",
        required=True,
        help="reward model directory or path/to/file.py:function (repeat to sum several)",
    )
    parser.add_argument("--pairs", help="JSONL/CSV/Parquet file with prompt, better, worse columns")
    parser.add_argument(
        "--pair", action="append", default=[], help='one easy case: "prompt|||better|||worse"'
    )
    parser.add_argument("--data", help="JSONL/CSV/Parquet file with prompt and response columns (samples)")
    parser.add_argument("--out", default="check_reward", help="output directory (default: check_reward)")
    parser.add_argument("--baseline", choices=["none", "prompt"], default="none", help="reward baseline")
    parser.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="reward-model micro-batch size")
    parser.add_argument("--device", default="cpu", help="device for reward models")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``tether check-reward``. Exit status: 0 nothing flagged, 1 warnings, 2 bad arguments or inputs."""
    args = _parser().parse_args(argv)
    try:
        pairs = load_pairs(args.pairs) if args.pairs else []
        pairs += [parse_pair(p) for p in args.pair]
        if not pairs and args.data is None:
            raise DataError("give easy cases (--pairs FILE or --pair) and/or samples (--data FILE)")
        prompts = responses = None
        columns: dict[str, list[Any]] = {}
        if args.data is not None:
            prompts, responses, columns = load_samples(args.data)
        spec = args.reward if len(args.reward) > 1 else args.reward[0]
        reward = build_reward(
            spec,
            baseline=args.baseline,
            device=args.device,
            max_length=args.max_length,
            batch_size=args.batch_size,
        )
        report = check_reward(
            reward,
            pairs=pairs or None,
            prompts=prompts,
            responses=responses,
            out_dir=args.out,
            columns=columns,
        )
    except (DataError, RewardError, OSError) as err:
        print(f"tether check-reward: error: {err}", file=sys.stderr)
        return 2
    print(f"reward: {reward!r}")
    print(format_report(report))
    return 1 if report.warnings else 0
