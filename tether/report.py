"""``tether report``: one or more run directories -> one self-contained HTML report.

The report follows the TRL training FAQ's order of reading: first the mean reward and the objective KL (keep
it within about 0..10, never negative), then what explains them (entropy, response length, clipping, value
fit, throughput), then the generations themselves, the config and the health warnings
(:func:`tether.health.check_history`). Plots are PNGs embedded as base64 (matplotlib's Agg renderer, no
pyplot global state), with no external CSS or JavaScript, so the file can be mailed or attached to an issue.

Every plot is one metric key, and its ``<img>`` has ``alt="plot: <key>"`` and ``id="plot-<slug>"`` so tools
and tests can tell which plots are present. Several run directories overlay their curves, labelled by run
directory name. A plot whose key no run logged is skipped and named in a short note.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import io
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.health import HealthMonitor, HealthWarning, check_history
from tether.logging.base import format_cell, sample_columns
from tether.logging.jsonl import METRICS_FILE, SAMPLES_FILE, read_jsonl
from tether.report_quality import KL_TOKENS_FILE, quality_section_html

CONFIG_FILE = "config.yaml"
REPORT_FILE = "report.html"

#: Sample rows shown per step, and characters per text cell, so a report stays readable and small.
MAX_SAMPLE_ROWS = 8
MAX_CELL_CHARS = 600


class ReportError(ValueError):
    """A run directory that cannot be reported on (missing, no metrics.jsonl, bad arguments)."""


@dataclass(frozen=True)
class PlotSpec:
    """One plot: a metric key, optionally with a ± std band from another key and reference lines."""

    key: str
    band_key: str | None = None
    hlines: tuple[float, ...] = ()


@dataclass(frozen=True)
class Section:
    """A group of plots under one heading, with a line on what to look for."""

    title: str
    hint: str
    plots: tuple[PlotSpec, ...]


SECTIONS: tuple[Section, ...] = (
    Section(
        "Reward",
        "Mean score per batch (band: ± one std within the batch). The first number to watch: it should rise.",
        (PlotSpec("objective/scores", band_key="objective/scores_std"), PlotSpec("objective/rlhf_reward")),
    ),
    Section(
        "KL and KL coefficient",
        "Objective KL to the reference model: keep it within about 0..10; negative KL is a bug symptom "
        "(check top_k / top_p / min_length generation settings).",
        (
            PlotSpec("objective/kl", hlines=(0.0, 10.0)),
            PlotSpec("kl/coef"),
            PlotSpec("kl/negative_fraction", hlines=(0.5,)),
        ),
    ),
    Section(
        "Non-score reward",
        "The KL penalty's part of the reward, -coef * KL: more negative as the policy drifts.",
        (PlotSpec("objective/non_score_reward"),),
    ),
    Section(
        "Entropy",
        "Sequence entropy of the policy. A collapse towards 0 means it no longer explores.",
        (PlotSpec("objective/entropy"),),
    ),
    Section(
        "Response length",
        "Mean tokens per response and the fraction ending with EOS (group trainers also log the shortest, the "
        "longest and the share cut at max_new_tokens). Watch for collapse to ~0 or pinning at max_new_tokens.",
        (
            PlotSpec("rollout/response_length"),
            PlotSpec("rollout/eos_fraction"),
            PlotSpec("rollout/response_length_min"),
            PlotSpec("rollout/response_length_max"),
            PlotSpec("rollout/truncated_fraction"),
        ),
    ),
    Section(
        "Groups",
        "Share of prompts whose completions all scored the same: under a group baseline their advantage is 0 "
        "and they teach nothing. Near 1 means the task is too easy or too hard for the policy as it is.",
        (PlotSpec("rollout/frac_reward_zero_std", hlines=(0.5,)),),
    ),
    Section(
        "Policy",
        "Fraction of tokens whose ratio was clipped (group trainers split it into the low side, A < 0, and the "
        "high side, A > 0), and the approximate KL between the policy before and after each update. Both rising "
        "steadily suggests too large a learning rate or too many epochs.",
        (
            PlotSpec("policy/clipfrac"),
            PlotSpec("policy/clipfrac_low"),
            PlotSpec("policy/clipfrac_high"),
            PlotSpec("policy/approx_kl"),
            PlotSpec("policy/loss"),
            PlotSpec("policy/kl_loss"),
        ),
    ),
    Section(
        "Value",
        "Value-head loss and explained variance (1 is perfect, below 0 is worse than a constant).",
        (
            PlotSpec("value/loss"),
            PlotSpec("value/explained_variance", hlines=(0.0,)),
            PlotSpec("value/clipfrac"),
        ),
    ),
    Section(
        "Throughput",
        "Episodes and generated tokens per second, and where each step's time goes.",
        (
            PlotSpec("perf/episodes_per_s"),
            PlotSpec("perf/gen_tokens_per_s"),
            PlotSpec("time/rollout_s"),
            PlotSpec("time/update_s"),
            PlotSpec("lr"),
        ),
    ),
    Section(
        "Reward model",
        "Pairwise loss and accuracy (chosen scored above rejected), and the mean chosen-minus-rejected margin.",
        (
            PlotSpec("train/loss"),
            PlotSpec("eval/loss"),
            PlotSpec("train/accuracy", hlines=(0.5,)),
            PlotSpec("eval/accuracy", hlines=(0.5,)),
            PlotSpec("eval/margin_mean", hlines=(0.0,)),
        ),
    ),
)

#: Rows of the summary table: key -> label (a key no run logged is left out).
SUMMARY_KEYS: dict[str, str] = {
    "objective/scores": "mean reward",
    "objective/kl": "KL",
    "eval/accuracy": "eval accuracy",
}


@dataclass(frozen=True)
class RunData:
    """What the report reads from one run directory."""

    name: str
    path: Path
    metrics: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    config_text: str | None
    warnings: list[HealthWarning]
    kl_tokens: list[dict[str, Any]] = field(default_factory=list)  # kl_tokens.jsonl rows


# -- reading ------------------------------------------------------------------------------------------------


def _find_max_new_tokens(config: Any) -> int | None:
    """The first ``max_new_tokens`` integer anywhere in a parsed config, for the length health check."""
    if isinstance(config, Mapping):
        value = config.get("max_new_tokens")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        for child in config.values():
            found = _find_max_new_tokens(child)
            if found is not None:
                return found
    return None


def _parse_config(text: str | None) -> Any:
    """The config as data, or None when it is absent or unparsable (the report shows the text regardless)."""
    if text is None:
        return None
    try:
        import yaml

        return yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - a config we cannot parse must not stop the report
        return None


def load_run(run_dir: Path, name: str | None = None) -> RunData:
    """Read one run directory.

    Raises:
        ReportError: if the directory is missing or has no ``metrics.jsonl``.
        JsonlFormatError: on a malformed line of ``metrics.jsonl`` or ``samples.jsonl`` (names file and line).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ReportError(f"run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise ReportError(f"not a directory: {run_dir}")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ReportError(f"{run_dir}: no {METRICS_FILE} (is this a tether run directory?)")
    metrics = read_jsonl(metrics_path)
    samples_path = run_dir / SAMPLES_FILE
    samples = read_jsonl(samples_path) if samples_path.is_file() else []
    config_path = run_dir / CONFIG_FILE
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    monitor = HealthMonitor(max_new_tokens=_find_max_new_tokens(_parse_config(config_text)))
    return RunData(
        name=name or run_dir.name,
        path=run_dir,
        metrics=metrics,
        samples=samples,
        config_text=config_text,
        warnings=check_history(metrics, monitor),
        kl_tokens=read_jsonl(run_dir / KL_TOKENS_FILE) if (run_dir / KL_TOKENS_FILE).is_file() else [],
    )


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Legend names: the directory name, widened to ``parent/name`` (then numbered) where two would clash."""
    names = [p.resolve().name or str(p) for p in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    return names


# -- plotting -----------------------------------------------------------------------------------------------


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that have ``key``; non-finite values become NaN (gaps in the line)."""
    steps: list[float] = []
    values: list[float] = []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(float(row["step"]))
            values.append(float(value) if math.isfinite(value) else math.nan)
    return steps, values


def _has_key(runs: Sequence[RunData], key: str) -> bool:
    return any(_series(run.metrics, key)[0] for run in runs)


def render_plot(runs: Sequence[RunData], spec: PlotSpec) -> str:
    """One plot as base64 PNG: a line per run that logged ``spec.key``, legend by run name when several."""
    # Imported here: matplotlib costs ~0.5 s to import and only the report needs it.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4, 3.0), dpi=90)
    # Fixed margins instead of a layout engine: constrained/tight layout doubles the rendering time, and
    # every plot here has the same furniture (title, x label, short tick labels).
    fig.subplots_adjust(left=0.13, right=0.97, top=0.9, bottom=0.16)
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(runs))]  # one colour per run, the same in every plot
    for run, color in zip(runs, colors, strict=True):
        steps, values = _series(run.metrics, spec.key)
        if not steps:
            continue
        marker = "o" if len(steps) <= 25 else None  # sparse series (eval every N steps) stay visible
        ax.plot(steps, values, color=color, marker=marker, markersize=3, linewidth=1.4, label=run.name)
        if spec.band_key is not None:
            band = dict(zip(*_series(run.metrics, spec.band_key), strict=True))
            pairs = [(s, v, band[s]) for s, v in zip(steps, values, strict=True) if s in band]
            if pairs:
                xs, mids, stds = zip(*pairs, strict=True)
                lower = [m - s for m, s in zip(mids, stds, strict=True)]
                upper = [m + s for m, s in zip(mids, stds, strict=True)]
                ax.fill_between(xs, lower, upper, color=color, alpha=0.18, linewidth=0)
    # Reference lines (KL 0 and 10, accuracy 0.5 ...) only when near the data: a line far outside would squash
    # the curve into a flat band at the edge of the plot.
    low, high = ax.get_ylim()
    margin = 0.25 * (high - low)
    for y in spec.hlines:
        if low - margin <= y <= high + margin:
            ax.axhline(y, color="0.55", linestyle="--", linewidth=0.8)
    ax.set_title(spec.key, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no version string: stable output
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_id(key: str) -> str:
    """The stable HTML id of a metric's plot: ``objective/kl`` -> ``plot-objective-kl``."""
    return "plot-" + re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")


# -- HTML ---------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em;
       margin-top: 1.8em; } h3 { font-size: 1.05em; }
.hint, .note { color: #555; font-size: .92em; } .note { font-style: italic; }
.plots { display: flex; flex-wrap: wrap; gap: .6em; }
figure { margin: 0; } figcaption { font-size: .8em; color: #555; text-align: center; }
table { border-collapse: collapse; font-size: .88em; margin: .4em 0 1em; }
th, td { border: 1px solid #ddd; padding: .25em .5em; vertical-align: top; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; max-width: 34em; overflow-wrap: anywhere; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
.warn td { background: #fff6e5; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    return "-" if value is None else format_cell(value, digits=4)


def _first_last(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[float | None, float | None]:
    values = [v for v in _series(rows, key)[1] if not math.isnan(v)]
    return (values[0], values[-1]) if values else (None, None)


def _duration(rows: Sequence[Mapping[str, Any]]) -> str:
    times = [r["time"] for r in rows if isinstance(r.get("time"), (int, float)) and math.isfinite(r["time"])]
    if len(times) < 2:
        return "-"
    return str(datetime.timedelta(seconds=round(times[-1] - times[0])))


def _summary_html(runs: Sequence[RunData]) -> str:
    keys = [key for key in SUMMARY_KEYS if _has_key(runs, key)]
    head = ["run", "steps logged", "last step", "episodes", "duration"]
    head += [f"{SUMMARY_KEYS[k]} first → last" for k in keys] + ["health warnings"]
    lines = ["<table>", "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"]
    for run in runs:
        rows = run.metrics
        episodes = [r["episode"] for r in rows if isinstance(r.get("episode"), int)]
        cells = [
            _esc(run.name),
            str(len(rows)),
            str(rows[-1]["step"]) if rows else "-",
            str(episodes[-1]) if episodes else "-",
            _duration(rows),
        ]
        for key in keys:
            first, last = _first_last(rows, key)
            cells.append(f"{_fmt(first)} → {_fmt(last)}")
        cells.append(str(len(run.warnings)))
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    if any(not run.metrics for run in runs):
        lines.append('<p class="note">A run with no steps logged yet has nothing to plot.</p>')
    return "\n".join(lines)


def _plots_html(runs: Sequence[RunData]) -> str:
    parts: list[str] = []
    skipped_sections: list[str] = []
    for section in SECTIONS:
        present = [spec for spec in section.plots if _has_key(runs, spec.key)]
        missing = [spec.key for spec in section.plots if spec not in present]
        if not present:
            skipped_sections.append(f"{section.title} ({', '.join(missing)})")
            continue
        parts.append(f"<h2>{_esc(section.title)}</h2>")
        parts.append(f'<p class="hint">{_esc(section.hint)}</p>')
        parts.append('<div class="plots">')
        parts.extend(_figure_html(runs, spec) for spec in present)
        parts.append("</div>")
        if missing:
            parts.append(f'<p class="note">Not logged by any run, skipped: {_esc(", ".join(missing))}.</p>')
    if skipped_sections:
        parts.append("<h2>Skipped plots</h2>")
        parts.append(
            '<p class="note">Not logged by any run (e.g. GRPO has no value head; reward-model runs have no '
            "rollouts): " + _esc("; ".join(skipped_sections)) + ".</p>"
        )
    return "\n".join(parts)


def _figure_html(runs: Sequence[RunData], spec: PlotSpec) -> str:
    shown = ", ".join(run.name for run in runs if _series(run.metrics, spec.key)[0])
    return (
        f'<figure id="{plot_id(spec.key)}"><img alt="plot: {_esc(spec.key)}" '
        f'src="data:image/png;base64,{render_plot(runs, spec)}">'
        f"<figcaption>{_esc(spec.key)} — {_esc(shown)}</figcaption></figure>"
    )


def _pick_sample_steps(steps: Sequence[int]) -> list[int]:
    """First, middle and last step that have samples (fewer if fewer exist)."""
    unique = sorted(set(steps))
    if not unique:
        return []
    picks = [unique[0], unique[len(unique) // 2], unique[-1]]
    return sorted(set(picks))


def _cell_html(column: str, value: Any) -> str:
    if isinstance(value, str):
        text = value if len(value) <= MAX_CELL_CHARS else value[: MAX_CELL_CHARS - 1] + "…"
        return f'<td class="text">{_esc(text)}</td>'
    return f'<td class="num">{_esc(_fmt(value))}</td>'


def _samples_html(run: RunData) -> str:
    if not run.samples:
        return '<p class="note">No samples logged (samples.jsonl missing or empty).</p>'
    parts: list[str] = []
    for step in _pick_sample_steps([row["step"] for row in run.samples]):
        rows = [row for row in run.samples if row["step"] == step]
        columns = sample_columns(rows)
        parts.append(f"<h3>Step {step}</h3>")
        parts.append("<table><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in columns) + "</tr>")
        for row in rows[:MAX_SAMPLE_ROWS]:
            parts.append("<tr>" + "".join(_cell_html(c, row.get(c)) for c in columns) + "</tr>")
        parts.append("</table>")
        if len(rows) > MAX_SAMPLE_ROWS:
            parts.append(f'<p class="note">Showing {MAX_SAMPLE_ROWS} of {len(rows)} rows.</p>')
    return "\n".join(parts)


def _warnings_html(run: RunData) -> str:
    if not run.warnings:
        return '<p class="note">No health warnings.</p>'
    lines = ["<table><tr><th>step</th><th>code</th><th>what the metrics show</th><th>what to try</th></tr>"]
    for w in run.warnings:
        lines.append(
            f'<tr class="warn"><td class="num">{w.step}</td><td>{_esc(w.code)}</td>'
            f'<td class="text">{_esc(w.message)}</td><td class="text">{_esc(w.advice)}</td></tr>'
        )
    lines.append("</table>")
    return "\n".join(lines)


def render_html(runs: Sequence[RunData]) -> str:
    """The whole report as one HTML string."""
    names = ", ".join(run.name for run in runs)
    several = len(runs) > 1
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>tether report: {_esc(names)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>tether report: {_esc(names)}</h1>",
        '<p class="hint">Generated '
        + _esc(datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))
        + " from "
        + ", ".join(f"<code>{_esc(run.path)}</code>" for run in runs)
        + ".</p>",
        '<h2 id="summary">Summary</h2>',
        _summary_html(runs),
        _plots_html(runs),
        quality_section_html(runs, lambda key: _figure_html(runs, PlotSpec(key))),
        '<h2 id="samples">Samples</h2>',
    ]
    for run in runs:
        if several:
            parts.append(f"<h3>{_esc(run.name)}</h3>")
        parts.append(_samples_html(run))
    parts.append('<h2 id="health">Health warnings</h2>')
    for run in runs:
        if several:
            parts.append(f"<h3>{_esc(run.name)}</h3>")
        parts.append(_warnings_html(run))
    parts.append('<h2 id="config">Config</h2>')
    for run in runs:
        if several:
            parts.append(f"<h3>{_esc(run.name)}</h3>")
        if run.config_text is None:
            parts.append(f'<p class="note">No {CONFIG_FILE} in {_esc(run.path)}.</p>')
        else:
            parts.append(f'<pre class="config">{_esc(run.config_text)}</pre>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build_report(run_dirs: Sequence[Path], out_path: Path | None = None) -> Path:
    """Write an HTML report for one or more run directories and return its path.

    Args:
        run_dirs: run directories (each with ``metrics.jsonl``; ``samples.jsonl`` and ``config.yaml`` optional).
            Several are overlaid in every plot, labelled by directory name.
        out_path: where to write. Defaults to ``run_dir/report.html`` for one run; required for several.

    Raises:
        ReportError: no run dirs, several without ``out_path``, a missing dir or one without metrics.jsonl.
        JsonlFormatError: a malformed JSONL line (the message names the file and line number).
    """
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ReportError("no run directory given")
    if out_path is None:
        if len(paths) > 1:
            raise ReportError("several run directories need an output path (-o OUT.html)")
        out_path = paths[0] / REPORT_FILE
    runs = [load_run(path, name) for path, name in zip(paths, _run_names(paths), strict=True)]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(render_html(runs), encoding="utf-8")
    return out_path


def main(argv: list[str] | None = None) -> int:
    """``tether report RUN_DIR [RUN_DIR ...] [-o OUT.html]``. Returns the exit status (0 ok, 1 error, 2 usage)."""
    parser = argparse.ArgumentParser(
        prog="tether report",
        description="Write a self-contained HTML report (plots, samples, config, health warnings) for run "
        "directories. Several runs are overlaid.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directory")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="output HTML file (default: RUN_DIR/report.html for one run)",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2): return the code instead of exiting
        return int(exit_.code or 0)
    try:
        path = build_report(args.run_dirs, args.output)
    except (ValueError, OSError) as err:  # ReportError, JsonlFormatError, unreadable files
        print(f"tether report: error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
