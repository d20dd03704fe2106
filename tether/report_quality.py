"""The report's reward-hacking section: text-quality plots, the quality baseline and the KL-by-token table.

Kept apart from :mod:`tether.report` (which calls :func:`quality_section_html`) so that file stays readable.
What the numbers mean is in :mod:`tether.quality` and docs/reward_hacking.md.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from tether.logging.base import KL_TOKENS_TABLE, format_cell
from tether.quality import BASELINE_STEPS, QUALITY_KEYS, baseline_of

KL_TOKENS_FILE = f"{KL_TOKENS_TABLE}.jsonl"
#: Plots of the section, in order: the quality metrics, then the KL's concentration on token types.
QUALITY_PLOTS: tuple[str, ...] = (*QUALITY_KEYS, "kl/top5_token_share")
#: Steps shown side by side in the KL-by-token table, and token types per step.
KL_TABLE_STEPS = 5
KL_TABLE_SHOWN = 8

HINT = (
    "Reward hacking shows in the text before the reward or the KL flag it: diversity falls (distinct-1/2 down, "
    "repeated 3-grams and the top-5 tokens' share up) and the KL concentrates on a few token types. The "
    "baseline is the mean of the first {n} steps. In the KL-by-token table, a handful of reward words "
    '("love", "joy", "!") climbing to the top while the reward rises is the pattern to look for.'
)


class RunLike(Protocol):
    """What the section reads of a :class:`tether.report.RunData`."""

    name: str
    metrics: list[dict[str, Any]]
    kl_tokens: list[dict[str, Any]]


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _last(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return float(values[-1]) if values else None


def baseline_html(run: RunLike, steps: int = BASELINE_STEPS) -> str:
    """A table per run: each quality metric's baseline (mean of steps 1..``steps``), last value and change."""
    base = baseline_of(run.metrics, QUALITY_PLOTS, steps)
    if not base:
        return ""
    lines = [
        f"<table><tr><th>metric</th><th>baseline (steps 1-{steps})</th><th>last</th><th>change</th></tr>"
    ]
    for key, value in base.items():
        last = _last(run.metrics, key)
        change = "-" if last is None else f"{last - value:+.3f}"
        cells = [_esc(key), format_cell(value, 3), "-" if last is None else format_cell(last, 3), change]
        lines.append("<tr>" + "".join(f'<td class="num">{c}</td>' for c in cells) + "</tr>")
    return "\n".join(lines + ["</table>"])


def pick_table_steps(steps: Sequence[int], n: int = KL_TABLE_STEPS) -> list[int]:
    """Up to ``n`` steps spread evenly from the first to the last (both always included)."""
    unique = sorted(set(steps))
    if len(unique) <= n:
        return unique
    return sorted({unique[round(i * (len(unique) - 1) / (n - 1))] for i in range(n)})


def kl_tokens_html(rows: Sequence[Mapping[str, Any]], shown: int = KL_TABLE_SHOWN) -> str:
    """The KL-by-token table: one column per picked step, one row per rank, each cell a token type with its
    share of the step's KL and its count. ``rows``: ``kl_tokens.jsonl`` records."""
    if not rows:
        return f'<p class="note">No KL attribution logged ({KL_TOKENS_FILE} missing or empty).</p>'
    picked = pick_table_steps([int(r["step"]) for r in rows])
    by_step = {s: sorted((r for r in rows if r["step"] == s), key=lambda r: r.get("rank", 0)) for s in picked}
    head = "".join(f"<th>step {s}</th>" for s in picked)
    lines = [f'<table class="kl-tokens"><tr><th>rank</th>{head}</tr>']
    for rank in range(shown):
        cells = []
        for s in picked:
            entries = by_step[s]
            if rank < len(entries):
                r = entries[rank]
                cells.append(
                    f'<td class="text"><code>{_esc(repr(r.get("token", "")))}</code> '
                    f"{100 * float(r.get('share', 0.0)):.1f}% (KL {format_cell(r.get('kl'), 3)}, "
                    f"×{r.get('count', 0)})</td>"
                )
            else:
                cells.append("<td></td>")
        lines.append(f'<tr><td class="num">{rank + 1}</td>' + "".join(cells) + "</tr>")
    return "\n".join(lines + ["</table>"])


def quality_section_html(runs: Sequence[RunLike], figure: Callable[[str], str]) -> str:
    """The whole section: plots of the quality metrics present (``figure(key)`` renders one as a
    ``<figure>``), then per run the baseline table and the KL-by-token table. Empty when no run logged any."""
    present = [key for key in QUALITY_PLOTS if any(key in row for run in runs for row in run.metrics)]
    if not present and not any(run.kl_tokens for run in runs):
        return ""
    parts = [
        '<h2 id="quality">Text quality and KL by token</h2>',
        f'<p class="hint">{_esc(HINT.format(n=BASELINE_STEPS))}</p>',
        '<div class="plots">',
        *(figure(key) for key in present),
        "</div>",
    ]
    for run in runs:
        if len(runs) > 1:
            parts.append(f"<h3>{_esc(run.name)}</h3>")
        parts.append(baseline_html(run))
        parts.append(
            '<p class="hint">Token types carrying the most KL (summed over the batch), with their share of the '
            "step's KL and how often they occur:</p>"
        )
        parts.append(kl_tokens_html(run.kl_tokens))
    return "\n".join(parts)
