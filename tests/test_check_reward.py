"""check_reward: flags a length-biased and a prompt-dominated reward, stays quiet on a clean one; the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tether.rewards import build_reward
from tether.rewards.check import between_group_share, check_reward, main, pearson

FILLERS = ["cat", "dog", "sat", "on", "mat", "a", "the"]


def samples(n_prompts: int, per_prompt: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Prompts repeated ``per_prompt`` times; responses start with 'good' or 'fine' (same length) at random,
    followed by a random number of fillers, so quality and length are independent by construction."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for i in range(n_prompts):
        for _ in range(per_prompt):
            prompts.append(f"question {i}: ")
            words = [rng.choice(["good", "fine"])] + rng.choices(FILLERS, k=rng.randint(1, 12))
            responses.append(" ".join(words))
    return prompts, responses


def clean(prompts: list[str], responses: list[str], **_: object) -> list[float]:
    return [1.0 if r.startswith("good") else 0.0 for r in responses]


def long_is_good(prompts: list[str], responses: list[str], **_: object) -> list[float]:
    return [0.1 * len(r) + (0.5 if r.startswith("good") else 0.0) for r in responses]


def prompt_heavy(prompts: list[str], responses: list[str], **_: object) -> list[float]:
    # 10 * the question number dwarfs the 0/1 quality signal
    return [
        10.0 * int(p.split()[1].rstrip(":")) + (1.0 if r.startswith("good") else 0.0)
        for p, r in zip(prompts, responses, strict=True)
    ]


def test_pearson_and_between_group_share_hand_computed() -> None:
    # x - mean = [-1, 0, 1]; y = [2, 4, 7], y - mean = [-7/3, -1/3, 8/3]; cov sum = 7/3 + 8/3 = 5;
    # r = 5 / sqrt(2 * 114/9) = 0.993399
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])) == pytest.approx(
        0.993399, abs=1e-6
    )
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 5.0, 5.0])) == 0.0
    # groups A = [1, 3], B = [5, 7]; grand mean 4; SS_total = 9 + 1 + 1 + 9 = 20; SS_between = 2*4 + 2*4 = 16;
    # MS_within = (20 - 16) / (4 - 2) = 2; epsilon^2 = (16 - 1 * 2) / 20 = 0.7   (eta^2 would be 0.8)
    share = between_group_share(torch.tensor([1.0, 3.0, 5.0, 7.0]), ["A", "A", "B", "B"])
    assert share == pytest.approx(0.7)
    assert between_group_share(torch.tensor([1.0, 2.0]), ["A", "B"]) is None  # no prompt repeats


def test_clean_reward_is_quiet(tmp_path: Path) -> None:
    prompts, responses = samples(40, 4)
    pairs = [("q: ", "good answer", "fine answer"), ("q2: ", "good", "fine")]
    report = check_reward(
        build_reward(clean), pairs=pairs, prompts=prompts, responses=responses, out_dir=tmp_path
    )
    assert report.warnings == []
    assert report.pair_accuracy == 1.0
    assert abs(report.length_correlation) < 0.2
    assert report.prompt_r2 == 0.0  # r(prompt + "") is constant for this reward
    assert report.prompt_share is not None and report.prompt_share < 0.1
    assert report.distribution is not None and report.distribution.count == 160
    saved = json.loads((tmp_path / "check_reward.json").read_text())
    assert saved["pair_accuracy"] == 1.0 and saved["warnings"] == []
    for name in ("score_histogram.png", "score_vs_length.png", "score_vs_prompt_score.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_length_biased_reward_is_flagged() -> None:
    prompts, responses = samples(40, 4)
    report = check_reward(build_reward(long_is_good), prompts=prompts, responses=responses)
    assert report.length_correlation is not None and report.length_correlation > 0.9
    assert len(report.warnings) == 1 and "response length" in report.warnings[0]
    assert "longer" in report.warnings[0]


def test_prompt_dominated_reward_is_flagged_and_baseline_fixes_it() -> None:
    prompts, responses = samples(40, 4)
    report = check_reward(build_reward(prompt_heavy), prompts=prompts, responses=responses)
    assert report.prompt_r2 is not None and report.prompt_r2 > 0.99
    assert report.prompt_share is not None and report.prompt_share > 0.99
    assert len(report.warnings) == 1 and 'reward_baseline = "prompt"' in report.warnings[0]
    fixed = check_reward(build_reward(prompt_heavy, baseline="prompt"), prompts=prompts, responses=responses)
    assert fixed.warnings == []
    # distinct prompts only: the R^2 against the prompt-alone score still finds it
    distinct_prompts, distinct_responses = samples(60, 1)
    distinct = check_reward(
        build_reward(prompt_heavy), prompts=distinct_prompts, responses=distinct_responses
    )
    assert distinct.prompt_share is None and distinct.prompt_r2 is not None and distinct.prompt_r2 > 0.99
    assert len(distinct.warnings) == 1


def test_wrongly_ordered_pair_is_flagged() -> None:
    pairs = [("q: ", "good", "fine"), ("q: ", "fine", "good")]
    report = check_reward(build_reward(clean), pairs=pairs)
    assert [p.ordered for p in report.pairs] == [True, False]
    assert report.pair_accuracy == 0.5
    assert report.warnings == [
        "1 of 2 easy pairs are scored the wrong way round (rows 1): check the reward on plain cases before "
        "training on it"
    ]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = tmp_path / "rewards.py"
    module.write_text(
        "def clean(prompts, responses, **kw):\n    return [1.0 if r.startswith('good') else 0.0 for r in responses]\n"
        "def long_is_good(prompts, responses, **kw):\n    return [float(len(r)) for r in responses]\n"
    )
    prompts, responses = samples(20, 3)
    data = tmp_path / "samples.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, responses, strict=True)
        )
    )
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "q: ", "better": "good", "worse": "fine"}) + "\n")
    out = tmp_path / "out"
    common = [
        "--pairs",
        str(pairs),
        "--pair",
        "q: |||good one|||fine one",
        "--data",
        str(data),
        "--out",
        str(out),
    ]
    assert main(["--reward", f"{module}:clean", *common]) == 0
    printed = capsys.readouterr().out
    assert "easy pairs: 2/2 ordered right" in printed and "no warnings" in printed
    assert (out / "check_reward.json").is_file()
    assert main(["--reward", f"{module}:long_is_good", *common]) == 1
    assert "score correlates with response length" in capsys.readouterr().out
    assert main(["--reward", f"{module}:clean", "--pair", "no separators"]) == 2
    assert "must be 'prompt|||better|||worse'" in capsys.readouterr().err
    assert main(["--reward", f"{module}:missing", "--pair", "a|||b|||c"]) == 2
    assert "has no function 'missing'" in capsys.readouterr().err
