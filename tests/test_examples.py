"""The example scripts a user copies run as shipped (a short version of each)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_ppo_custom_reward_example_runs(tmp_path, capsys):
    module = runpy.run_path(str(EXAMPLES / "ppo_custom_reward.py"))
    module["main"](["--output-dir", str(tmp_path / "run"), "--steps", "2"])
    out = capsys.readouterr().out
    assert "reward" in out and "report:" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["objective/kl"] == 0.0
    assert (tmp_path / "run" / "report.html").is_file() and (tmp_path / "run" / "final" / "config.json").is_file()


def test_grpo_verifiable_reward_example_runs(tmp_path, capsys):
    module = runpy.run_path(str(EXAMPLES / "grpo_verifiable_reward.py"))
    module["main"](["--output-dir", str(tmp_path / "run"), "--steps", "2"])
    assert "count reward" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"rewards/count_matches/mean", "rollout/frac_reward_zero_std"} <= set(rows[0])
    assert (tmp_path / "run" / "final" / "config.json").is_file()
