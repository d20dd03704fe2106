"""One PNG with the two curves the TRL Training FAQ says to watch first: mean reward and objective KL.

Used by ``tether demo`` (one run) and ``tether demo --compare`` (the KL and no-KL runs overlaid). Drawn with
matplotlib's Agg canvas and no pyplot global state, like :mod:`tether.report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

#: (metric key, panel title, horizontal reference lines) of the reward and KL plot.
PANELS: tuple[tuple[str, str, tuple[float, ...]], ...] = (
    ("objective/scores", "mean reward (objective/scores)", ()),
    ("objective/kl", "objective/kl to the reference (healthy: 0..10)", (0.0, 10.0)),
)


def plot_curves(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    out_path: str | Path,
    panels: Sequence[tuple[str, str, tuple[float, ...]]] = PANELS,
    title: str | None = None,
) -> Path:
    """Write a PNG with one panel per metric and one line per run.

    Args:
        runs: legend label -> per-step metric rows (``PPOTrainer.train()``'s history or ``metrics.jsonl``),
            each with a ``"step"`` key.
        out_path: the PNG to write (parent directories are created).
        panels: (metric key, panel title, reference y-values drawn as dotted lines) per panel.
        title: a title over all panels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * len(panels), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, panel_title, hlines) in zip(axes, panels, strict=True):
        for label, rows in runs.items():
            points = [(float(r["step"]), float(r[key])) for r in rows if key in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker=".", linewidth=1.4, label=label)
        for y in hlines:
            ax.axhline(y, color="grey", linestyle=":", linewidth=0.9)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
