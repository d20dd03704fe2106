"""``tether sample``: a policy's generations on a prompt file, as PPO draws them, written as JSONL.

Also the command-line path of reward normalisation: reference-policy samples from ``tether sample`` feed
``tether rm --normalize_data``, after which the saved reward model scores those samples mean 0 / std 1.
"""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest
import torch

from tether.cli import main as cli_main
from tether.rewards import build_reward
from tether.sample import sample_responses
from tether.sampling import KLBiasError, SamplingConfig
from tether.toy import make_toy_model, make_toy_prompts, make_toy_tokenizer


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    tok = make_toy_tokenizer()
    make_toy_model(tok, seed=0).save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    rows = [{"prompt": p, "target": "aeiou"[i % 5]} for i, p in enumerate(make_toy_prompts(6))]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rewards.py").write_text(textwrap.dedent("""
        def target_count(prompts, responses, target, **columns):
            return [float(r.count(t)) for r, t in zip(responses, target)]

        def length(prompts, responses, **columns):
            return [float(len(r)) for r in responses]
    """))
    return tmp_path


def sample(work: Path, out: str, *extra: str) -> int:
    return cli_main(["sample", "--policy", str(work / "policy"), "--prompts", str(work / "prompts.jsonl"),
                     "--output", str(work / out), "--device", "cpu", "--sampling.max_new_tokens", "7", *extra])


def test_rows_carry_prompt_columns_lengths_and_scores(work, capsys):
    spec = f"{work / 'rewards.py'}:target_count"
    assert sample(work, "s.jsonl", "--samples_per_prompt", "3", "--batch_size", "4", "--reward", spec,
                  "--reward", f"{work / 'rewards.py'}:length") == 0
    rows = read_jsonl(work / "s.jsonl")
    prompts = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in prompts for _ in range(3)]
    assert [r["target"] for r in rows] == [p["target"] for p in prompts for _ in range(3)]
    tok = make_toy_tokenizer()
    for r in rows:
        assert list(r)[:2] == ["prompt", "response"]
        # One token per character of the toy tokenizer; EOS (and any sampled UNK) counts as a response token
        # but is not in the decoded text.
        assert len(r["response"]) + int(r["has_eos"]) <= r["response_tokens"] <= 7
        assert r["has_eos"] or r["response_tokens"] == 7
        assert tok.eos_token not in r["response"]
        assert r["score/target_count"] == float(r["response"].count(r["target"]))
        assert r["score/length"] == float(len(r["response"]))
        assert r["score"] == pytest.approx(r["score/target_count"] + r["score/length"])
    out = capsys.readouterr().out
    assert f"wrote 18 samples to {work / 's.jsonl'}" in out
    assert "more rows in" in out  # 18 rows, 8 shown
    assert "|    score |   tokens" in out  # the table's number columns: the score and the response length


def test_same_seed_same_samples_and_num_prompts(work):
    assert sample(work, "a.jsonl", "--seed", "3", "--num_prompts", "4", "--show", "0") == 0
    assert sample(work, "b.jsonl", "--seed", "3", "--num_prompts", "4", "--show", "0") == 0
    assert sample(work, "c.jsonl", "--seed", "4", "--num_prompts", "4", "--show", "0") == 0
    a, b, c = (read_jsonl(work / f"{x}.jsonl") for x in "abc")
    assert len(a) == 4 and a == b
    assert [r["response"] for r in a] != [r["response"] for r in c]


def test_every_batch_size_gives_one_bounded_response_per_prompt():
    tok = make_toy_tokenizer()
    policy = make_toy_model(tok, seed=0)
    prompts = make_toy_prompts(5)
    for batch_size in (1, 2, 5):
        rows = sample_responses(policy, tok, prompts, SamplingConfig(max_new_tokens=4), batch_size)
        assert len(rows) == 5 and all(1 <= r["response_tokens"] <= 4 for r in rows)


def test_kl_biasing_settings_and_bad_input_are_refused(work, capsys):
    assert sample(work, "x.jsonl", "--sampling.top_k", "5") == 2
    assert "top_k=5" in capsys.readouterr().err
    with pytest.raises(KLBiasError):
        sample_responses(make_toy_model(make_toy_tokenizer()), make_toy_tokenizer(), ["ab"],
                         SamplingConfig(min_new_tokens=2), 1)
    assert cli_main(["sample", "--policy", str(work / "policy")]) == 2
    assert "--prompts" in capsys.readouterr().err
    assert sample(work, "x.jsonl", "--samples_per_prompt", "0") == 2
    assert "samples_per_prompt" in capsys.readouterr().err
    assert not (work / "x.jsonl").exists()


def test_reference_samples_normalise_a_trained_reward_model(work):
    """tether sample (reference policy) -> tether rm --normalize_data -> scores mean 0 / std 1 on them."""
    rng = random.Random(0)

    def word(vowel_share: float) -> str:
        return "".join(rng.choice("aeiou") if rng.random() < vowel_share else rng.choice("bcdfgkmnpst")
                       for _ in range(rng.randint(4, 8)))

    prefs = [{"prompt": p, "chosen": " " + word(0.8), "rejected": " " + word(0.1)}
             for p in make_toy_prompts(24, seed=1)]
    (work / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    assert sample(work, "ref.jsonl", "--samples_per_prompt", "4", "--show", "0") == 0
    assert cli_main(["rm", "--model", str(work / "policy"), "--data", str(work / "prefs.jsonl"),
                     "--output_dir", str(work / "rm"), "--num_epochs", "1", "--learning_rate", "1e-3",
                     "--report_to", "none", "--report", "false", "--device", "cpu",
                     "--normalize_data", str(work / "ref.jsonl")]) == 0
    ref = read_jsonl(work / "ref.jsonl")
    scores = build_reward(str(work / "rm" / "final"))([r["prompt"] for r in ref], [r["response"] for r in ref]).scores
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-4)
    # ... and a different set of texts does not (the normalisation is fitted to the reference samples).
    other = build_reward(str(work / "rm" / "final"))([p["prompt"] for p in prefs], [p["chosen"] for p in prefs])
    assert abs(other.scores.mean().item()) > 1e-2 or abs(other.scores.std().item() - 1.0) > 1e-2
    assert torch.isfinite(scores).all()
