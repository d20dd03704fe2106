"""Tests for tether.report: plots present/skipped, samples, config, overlays, health warnings, CLI errors."""

from __future__ import annotations

import base64
import math
import random
import re
from pathlib import Path

import pytest

from tether.logging import JsonlFormatError, JsonlLogger
from tether.report import ReportError, build_report, main, plot_id

CONFIG = (
    "model: tiny-gpt2\nlearning_rate: 1.0e-05\nsampling:\n  max_new_tokens: 24\n  top_k: 0\n  top_p: 1.0\n"
)

PPO_PLOTS = [
    "objective/scores",
    "objective/kl",
    "kl/coef",
    "objective/non_score_reward",
    "objective/entropy",
    "rollout/response_length",
    "policy/clipfrac",
    "policy/approx_kl",
    "value/loss",
    "value/explained_variance",
    "perf/episodes_per_s",
    "perf/gen_tokens_per_s",
]
RM_PLOTS = ["train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "eval/margin_mean"]


def make_ppo_run(
    run_dir: Path, steps: int = 30, seed: int = 0, grpo: bool = False, kl_scale: float = 4.0
) -> None:
    """A realistic PPO (or GRPO: no value head) run directory: metrics, samples every 10 steps, config."""
    rng = random.Random(seed)
    logger = JsonlLogger(run_dir)
    coef = 0.05
    for step in range(1, steps + 1):
        kl = kl_scale * (1 - math.exp(-step / 10)) + abs(rng.gauss(0, 0.1))
        coef *= 1 + 0.1 * max(min((kl - 3) / 3, 0.2), -0.2)  # an adaptive controller with target 3
        score = 0.2 + 0.6 * (1 - math.exp(-step / 12)) + rng.gauss(0, 0.03)
        metrics = {
            "episode": 64 * step,
            "time": 1000.0 + 1.3 * step,
            "objective/scores": score,
            "objective/scores_std": 0.3 - 0.004 * step,
            "objective/kl": kl,
            "objective/non_score_reward": -coef * kl,
            "objective/rlhf_reward": score - coef * kl,
            "objective/entropy": 30 - 0.3 * step + rng.gauss(0, 0.4),
            "policy/approx_kl": 0.01 + 0.005 * rng.random(),
            "policy/clipfrac": 0.1 + 0.05 * rng.random(),
            "policy/loss": rng.gauss(0, 0.1),
            "kl/coef": coef,
            "kl/negative_fraction": max(0.4 - 0.02 * step, 0.05),
            "rollout/response_length": 18 + rng.gauss(0, 1),
            "rollout/eos_fraction": 0.85,
            "perf/episodes_per_s": 50 + rng.gauss(0, 2),
            "perf/gen_tokens_per_s": 900 + rng.gauss(0, 20),
            "time/rollout_s": 0.8,
            "time/update_s": 0.5,
            "lr": 1e-5,
        }
        if not grpo:
            metrics.update(
                {
                    "value/loss": 1 / step + 0.05,
                    "value/clipfrac": 0.05,
                    "value/explained_variance": -0.4 + step / 15,
                }
            )
        logger.log_metrics(metrics, step)
        if step == 1 or step % 10 == 0:
            rows = [
                {
                    "prompt": f"Review <{i}> & rate:",
                    "response": f"step-{step}-response-{i}: great film",
                    "score": score,
                    "kl": kl,
                }
                for i in range(3)
            ]
            logger.log_samples(rows, step)
    logger.close()
    (run_dir / "config.yaml").write_text(CONFIG)


def make_rm_run(run_dir: Path, steps: int = 20) -> None:
    logger = JsonlLogger(run_dir)
    for step in range(1, steps + 1):
        metrics = {"episode": 32 * step, "train/loss": 0.7 / step**0.3, "train/accuracy": 0.5 + 0.02 * step}
        if step % 5 == 0:
            metrics.update(
                {
                    "eval/loss": 0.6 / step**0.2,
                    "eval/accuracy": 0.55 + 0.015 * step,
                    "eval/margin_mean": 0.1 * step,
                }
            )
        logger.log_metrics(metrics, step)
    logger.close()


def plot_alts(html: str) -> set[str]:
    return set(re.findall(r'<img alt="plot: ([^"]+)"', html))


@pytest.fixture(scope="module")
def single_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("runs") / "ppo_run"
    make_ppo_run(run_dir)
    out = build_report([run_dir])
    return out, out.read_text(encoding="utf-8")


def test_default_output_path(single_report: tuple[Path, str]) -> None:
    out, _ = single_report
    assert out == out.parent / "report.html" and out.parent.name == "ppo_run"


def test_every_plot_is_present_with_a_stable_id(single_report: tuple[Path, str]) -> None:
    _, html = single_report
    alts = plot_alts(html)
    for key in PPO_PLOTS:
        assert key in alts, key
        assert f'id="{plot_id(key)}"' in html
    assert plot_id("objective/kl") == "plot-objective-kl"
    assert not alts & set(RM_PLOTS)
    assert "Reward model (train/loss" in html  # skipped with a note naming the keys


def test_report_is_self_contained(single_report: tuple[Path, str]) -> None:
    _, html = single_report
    assert "<script" not in html and "<link" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == len(plot_alts(html))
    assert all(base64.b64decode(image).startswith(b"\x89PNG\r\n\x1a\n") for image in images)


def test_summary_samples_and_config(single_report: tuple[Path, str]) -> None:
    _, html = single_report
    summary = html[html.index('id="summary"') : html.index('id="plot-')]
    assert "<td>ppo_run</td><td>30</td><td>30</td><td>1920</td>" in summary
    assert "mean reward first → last" in summary and "KL first → last" in summary
    samples = html[html.index('id="samples"') : html.index('id="health"')]
    # First, middle and last steps with samples (1, 10, 20, 30 were logged), text escaped.
    assert re.findall(r"<h3>Step (\d+)</h3>", samples) == ["1", "20", "30"]
    assert "Review &lt;0&gt; &amp; rate:" in samples and "step-30-response-2: great film" in samples
    assert "<th>prompt</th><th>response</th><th>score</th><th>kl</th>" in samples
    config = html[html.index('id="config"') :]
    assert '<pre class="config">model: tiny-gpt2\nlearning_rate: 1.0e-05\nsampling:' in config
    assert "No health warnings." in html[html.index('id="health"') :]


def test_absent_keys_are_skipped_with_a_note(tmp_path: Path) -> None:
    make_ppo_run(tmp_path / "grpo", grpo=True)
    html = build_report([tmp_path / "grpo"]).read_text()
    alts = plot_alts(html)
    assert "value/loss" not in alts and "value/explained_variance" not in alts
    assert "objective/scores" in alts
    assert "Value (value/loss, value/explained_variance, value/clipfrac)" in html


def test_two_runs_overlay_with_a_legend_by_name(tmp_path: Path) -> None:
    make_ppo_run(tmp_path / "run_a", seed=0)
    make_ppo_run(tmp_path / "run_b", seed=1, grpo=True)
    with pytest.raises(ReportError, match="-o"):
        build_report([tmp_path / "run_a", tmp_path / "run_b"])
    out = build_report([tmp_path / "run_a", tmp_path / "run_b"], tmp_path / "cmp" / "both.html")
    html = out.read_text()
    assert "<title>tether report: run_a, run_b</title>" in html
    assert "<figcaption>objective/kl — run_a, run_b</figcaption>" in html
    assert "<figcaption>value/loss — run_a</figcaption>" in html  # only the PPO run has a value head
    assert "<h3>run_a</h3>" in html and "<h3>run_b</h3>" in html
    assert html.count('<pre class="config">') == 2


def test_same_named_run_dirs_get_distinct_names(tmp_path: Path) -> None:
    make_ppo_run(tmp_path / "a" / "run", steps=5)
    make_ppo_run(tmp_path / "b" / "run", steps=5)
    html = build_report([tmp_path / "a" / "run", tmp_path / "b" / "run"], tmp_path / "r.html").read_text()
    assert "<figcaption>objective/kl — a/run, b/run</figcaption>" in html


def test_reward_model_curves(tmp_path: Path) -> None:
    make_rm_run(tmp_path / "rm")
    html = build_report([tmp_path / "rm"]).read_text()
    alts = plot_alts(html)
    assert set(RM_PLOTS) <= alts
    assert not alts & set(PPO_PLOTS)
    assert "No samples logged" in html and "No config.yaml" in html
    assert "eval accuracy first → last" in html


def test_health_warnings_and_nonfinite_values_are_reported(tmp_path: Path) -> None:
    run_dir = tmp_path / "hot"
    make_ppo_run(run_dir, kl_scale=14.0)  # KL climbs past 10 and stays there
    logger = JsonlLogger(run_dir)
    logger.log_metrics({"objective/scores": math.nan, "objective/kl": 13.0}, 31)
    logger.close()
    html = build_report([run_dir]).read_text()
    health = html[html.index('id="health"') : html.index('id="config"')]
    assert "<td>kl_high</td>" in health and "<td>nonfinite</td>" in health
    assert "objective/scores=nan" in health and "0..10" in health


@pytest.mark.parametrize("bad_file", ["metrics.jsonl", "samples.jsonl"])
def test_malformed_line_names_file_and_line(
    tmp_path: Path, bad_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    make_ppo_run(run_dir, steps=5)
    path = run_dir / bad_file
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-7]  # cut a line short in the middle of the file
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(JsonlFormatError, match=rf"{bad_file}:3: malformed JSON"):
        build_report([run_dir])
    assert main([str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:3: malformed JSON" in err and err.startswith("tether report: error:")


def test_cli_errors_for_missing_dir_and_missing_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path / "nope")]) == 1
    assert f"run directory not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(ReportError, match="no metrics.jsonl"):
        build_report([tmp_path / "empty"])
    assert main([]) == 2  # usage error from argparse, returned rather than raised


def test_cli_writes_the_report_and_prints_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_ppo_run(tmp_path / "run", steps=4)
    out = tmp_path / "out" / "r.html"
    assert main([str(tmp_path / "run"), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "plot: objective/scores" in out.read_text()
