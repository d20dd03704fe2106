"""End to end: a short PPO run on the toy task logs the quality metrics every step, the KL attribution table
(``kl_tokens.jsonl``), high-KL tokens in its sample table, and its report shows the new section."""

from __future__ import annotations

import html
import json
import re

import pytest

import tether
from tether.quality import KL_TABLE_ROWS, QUALITY_KEYS
from tether.toy import CharFractionReward, make_toy_model, make_toy_prompts, make_toy_tokenizer

BATCH = 8


def test_ppo_run_logs_quality_kl_tokens_and_reports_them(tmp_path) -> None:
    tok = make_toy_tokenizer()
    config = tether.PPOConfig(
        output_dir=str(tmp_path),
        seed=0,
        learning_rate=3e-3,
        total_episodes=BATCH * 3,
        rollout_batch_size=BATCH,
        mini_batch_size=BATCH,
        micro_batch_size=BATCH,
        ppo_epochs=1,
        sampling=tether.SamplingConfig(max_new_tokens=6),
        kl=tether.KLConfig(coef=0.05),
        logging=tether.LoggingConfig(report_to=["jsonl"], progress_bar=False, save_steps=0, sample_steps=1),
    )
    trainer = tether.PPOTrainer(
        config, policy=make_toy_model(tok, seed=0), tokenizer=tok, reward=CharFractionReward(),
        prompts=make_toy_prompts(16),
    )
    history = trainer.train()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in metrics:
        for key in (*QUALITY_KEYS, "kl/top5_token_share"):
            assert 0.0 <= row[key] <= 1.0, key
    assert metrics[0]["kl/top5_token_share"] == 0.0  # step 1: the policy is the reference, no KL to share
    assert [row["quality/distinct_1"] for row in metrics] == [row["quality/distinct_1"] for row in history]

    table = [json.loads(line) for line in (tmp_path / "kl_tokens.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in table}) == [1, 2, 3]
    for step, row in ((r["step"], r) for r in metrics if r["step"] > 1):
        rows = [r for r in table if r["step"] == step]
        assert 1 <= len(rows) <= KL_TABLE_ROWS and [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
        assert [r["kl"] for r in rows] == sorted((r["kl"] for r in rows), reverse=True)
        assert all(r["token"] == tok.decode([r["token_id"]]) and r["count"] >= 1 for r in rows)
        # share = kl / the step's summed KL, and that sum is the batch's objective/kl (a per-sequence mean)
        top = rows[0]
        assert top["kl"] / top["share"] == pytest.approx(BATCH * row["objective/kl"], rel=1e-4)

    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    later = [s for s in samples if s["step"] == 3 and s["response"]]
    assert later and all(re.fullmatch(r'(".*" -?[\d.e+-]+)(; ".*" -?[\d.e+-]+){0,2}', s["high_kl_tokens"])
                         for s in later)

    text = (tmp_path / "report.html").read_text()
    start = text.index('<h2 id="quality">')
    quality = text[start : text.index("<h2", start + 1)]
    for key in (*QUALITY_KEYS, "kl/top5_token_share"):
        assert f'alt="plot: {key}"' in quality, key
    assert "baseline (steps 1-3)" in quality and "<th>step 3</th>" in quality
    top_last = next(r for r in table if r["step"] == 3 and r["rank"] == 1)
    assert f"<code>{html.escape(repr(top_last['token']))}</code> {100 * top_last['share']:.1f}%" in quality
    assert "high_kl_tokens" in text  # the sample table's column
