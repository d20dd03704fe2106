"""The report of a real run: a short PPO run on the toy task writes report.html with every plot, the samples,
the config and the health section; its TensorBoard events parse; ``tether report`` overlays two runs; a health
warning raised during training reaches ``trainer.health_warnings`` and the report.

tests/test_report.py covers the report's rendering on synthetic metrics; this file checks it end to end.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import tether
from tether.cli import main as cli_main
from tether.health import HealthMonitor
from tether.toy import CharFractionReward, make_toy_model, make_toy_prompts, make_toy_tokenizer

#: The plots the report must show for a PPO run, by metric key (the issue's list, in the report's order).
PPO_PLOTS = (
    "objective/scores",  # reward mean, with a ± std band from objective/scores_std
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
)


@dataclass(frozen=True)
class Run:
    trainer: tether.PPOTrainer
    history: list[dict[str, float]]
    run_dir: Path


def train(run_dir: Path, steps: int, reward, report_to: list[str], seed: int = 0) -> Run:
    tok = make_toy_tokenizer()
    config = tether.PPOConfig(
        output_dir=str(run_dir),
        seed=seed,
        learning_rate=3e-3,
        total_episodes=8 * steps,
        rollout_batch_size=8,
        mini_batch_size=8,
        micro_batch_size=8,
        ppo_epochs=1,
        sampling=tether.SamplingConfig(max_new_tokens=6),
        # Adaptive: kl/coef moves, so its plot shows a curve rather than a constant.
        kl=tether.KLConfig(coef=0.05, target=1.0, horizon=64),
        logging=tether.LoggingConfig(report_to=report_to, progress_bar=False, save_steps=0, sample_steps=2),
    )
    trainer = tether.PPOTrainer(
        config, policy=make_toy_model(tok, seed=0), tokenizer=tok, reward=reward, prompts=make_toy_prompts(32)
    )
    return Run(trainer, trainer.train(), run_dir)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """4 PPO steps on the toy task, logged to JSONL and TensorBoard."""
    return train(
        tmp_path_factory.mktemp("report_run") / "vowels", 4, CharFractionReward(), ["jsonl", "tensorboard"]
    )


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A run whose reward is a constant: every response scores the same, so the policy learns nothing."""
    patience = HealthMonitor().patience  # reward_no_variance must hold this many steps in a row to fire

    def constant(prompts: list[str], responses: list[str], **columns: object) -> list[float]:
        return [0.5] * len(responses)

    return train(tmp_path_factory.mktemp("report_run") / "constant", patience, constant, ["jsonl"], seed=1)


def plots_in(text: str) -> set[str]:
    return {html.unescape(key) for key in re.findall(r'alt="plot: ([^"]+)"', text)}


def section(text: str, anchor: str) -> str:
    """The HTML from ``<h2 id="anchor">`` to the next ``<h2``."""
    start = text.index(f'<h2 id="{anchor}">')
    end = text.find("<h2", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_train_writes_the_report_with_every_plot(ppo_run: Run) -> None:
    report = ppo_run.run_dir / "report.html"
    assert ppo_run.trainer.report_path == report and report.is_file()
    text = report.read_text()
    missing = set(PPO_PLOTS) - plots_in(text)
    assert not missing, f"plots missing from the report: {sorted(missing)}"
    # The reward plot's band needs the within-batch spread; every plotted key was logged at every step.
    for row in ppo_run.history:
        for key in (*PPO_PLOTS, "objective/scores_std"):
            assert math.isfinite(row[key]), key
    assert len({row["kl/coef"] for row in ppo_run.history}) > 1  # the adaptive controller moved it
    for key in PPO_PLOTS:  # each plot is a real embedded PNG
        figure = re.search(rf'<figure id="plot-[^"]+"><img alt="plot: {re.escape(key)}" src="([^"]+)"', text)
        assert figure is not None and figure.group(1).startswith("data:image/png;base64,iVBOR"), key


def test_report_has_summary_samples_config_and_health(ppo_run: Run) -> None:
    text = (ppo_run.run_dir / "report.html").read_text()
    summary = section(text, "summary")
    assert "mean reward first → last" in summary and "<td>4</td>" in summary  # 4 steps logged

    samples = section(text, "samples")
    logged = [json.loads(line) for line in (ppo_run.run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted({row["step"] for row in logged}) == [1, 2, 4]  # step 1, then every sample_steps=2
    assert "<h3>Step 1</h3>" in samples and "<h3>Step 4</h3>" in samples
    assert "<th>prompt</th>" in samples and "<th>response</th>" in samples and "<th>score</th>" in samples
    assert html.escape(logged[0]["prompt"]) in samples

    config = html.unescape(section(text, "config"))
    assert '<pre class="config">' in config
    assert "rollout_batch_size: 8" in config and "report_to:\n  - jsonl\n  - tensorboard" in config

    health = section(text, "health")
    assert ppo_run.trainer.health_warnings == []
    assert "No health warnings." in health


def test_tensorboard_events_parse_and_hold_the_kl(ppo_run: Run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = ppo_run.run_dir / "tensorboard"
    assert list(tb_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    assert {"objective/kl", "objective/scores", "kl/coef"} <= set(events.Tags()["scalars"])
    kl = events.Scalars("objective/kl")
    assert [e.step for e in kl] == [1, 2, 3, 4]
    assert [e.value for e in kl] == pytest.approx([row["objective/kl"] for row in ppo_run.history], rel=1e-6)


def test_cli_report_overlays_two_runs(
    ppo_run: Run, flat_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "both.html"
    assert cli_main(["report", str(ppo_run.run_dir), str(flat_run.run_dir), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    text = out.read_text()
    assert "<title>tether report: vowels, constant</title>" in text
    assert set(PPO_PLOTS) <= plots_in(text)
    # Both runs are drawn in the same plot (the caption names the runs shown).
    assert "<figcaption>objective/kl — vowels, constant</figcaption>" in text
    assert "<h3>vowels</h3>" in section(text, "samples") and "<h3>constant</h3>" in section(text, "samples")
    # One summary row per run: the second row is the constant run's, with its health warning counted.
    rows = re.findall(r"<tr><td>(vowels|constant)</td>.*<td>(\d+)</td></tr>", section(text, "summary"))
    assert rows == [("vowels", "0"), ("constant", "1")]


def test_cli_report_writes_to_o_and_fails_on_a_missing_run(ppo_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "out.html"
    assert cli_main(["report", str(ppo_run.run_dir), "-o", str(out)]) == 0
    assert set(PPO_PLOTS) <= plots_in(out.read_text())
    assert cli_main(["report", str(tmp_path / "no_such_run")]) == 1


def test_trainer_health_warning_reaches_the_trainer_and_the_report(flat_run: Run) -> None:
    codes = [w.code for w in flat_run.trainer.health_warnings]
    assert "reward_no_variance" in codes
    warning = next(w for w in flat_run.trainer.health_warnings if w.code == "reward_no_variance")
    assert warning.step == len(flat_run.history)  # fires once the condition has held `patience` steps
    assert all(row["objective/scores_std"] == 0.0 for row in flat_run.history)
    health = section((flat_run.run_dir / "report.html").read_text(), "health")
    assert "<td>reward_no_variance</td>" in health
    assert html.escape(warning.message) in health
