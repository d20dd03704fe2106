"""Rewards from the command line: ``tether rm`` then ``tether ppo`` with the trained model, composed rewards,
the prompt baseline, a reward model with its own tokenizer, ``tether check-reward``, and the RM run's report.

Everything goes through ``tether.cli.main`` as a user's shell would, on the toy policy (tiny GPT-2, character
tokenizer) saved with ``save_pretrained``. The reward model is trained once per module.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import re
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_rewards_helpers import tiny_bert_rm
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast

from tether.cli import main as cli_main
from tether.toy import TOY_ALPHABET, make_toy_model, make_toy_prompts, make_toy_tokenizer

REWARDS_PY = '''
def vowels(prompts, responses, **columns):
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


def prompt_only(prompts, responses, **columns):
    """Depends on the prompt alone: the policy cannot change it."""
    return [len(p) + 0.1 * sum(c in "aeiou" for c in p) for p in prompts]


def longer(prompts, responses, **columns):
    """Length-biased: pays for characters, whatever they are."""
    return [0.5 * len(r) + (0.3 if r[:1] in "aeiou" else 0.0) for r in responses]
'''


@dataclass(frozen=True)
class Workdir:
    root: Path
    policy: Path
    prompts: Path
    rewards: Path
    preferences: Path


@dataclass(frozen=True)
class RMRun:
    exit_code: int
    stdout: str
    run_dir: Path

    @property
    def final(self) -> Path:
        return self.run_dir / "final"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def vowel_word(rng: random.Random, vowel_share: float) -> str:
    consonants = "bcdfghklmnprstvwz"
    n = rng.randint(4, 8)
    return "".join(
        rng.choice("aeiou") if rng.random() < vowel_share else rng.choice(consonants) for _ in range(n)
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Workdir:
    root = tmp_path_factory.mktemp("cli_rewards")
    tok = make_toy_tokenizer()
    make_toy_model(tok, seed=0).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in make_toy_prompts(16))
    )
    (root / "rewards.py").write_text(REWARDS_PY)
    # Synthetic preferences: the chosen response is mostly vowels, the rejected one mostly consonants.
    rng = random.Random(0)
    rows = [
        {"prompt": p, "chosen": " " + vowel_word(rng, 0.8), "rejected": " " + vowel_word(rng, 0.1)}
        for p in make_toy_prompts(48, seed=1)
    ]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Workdir(root, root / "policy", root / "prompts.jsonl", root / "rewards.py", root / "prefs.jsonl")


@pytest.fixture(scope="module")
def rm_run(work: Workdir) -> RMRun:
    """``tether rm`` on the toy LM (its backbone plus a new one-output score head), 43 pairs x 3 epochs."""
    run_dir = work.root / "rm"
    argv = [
        "rm", "--model", str(work.policy), "--data", str(work.preferences), "--output_dir", str(run_dir),
        "--learning_rate", "3e-3", "--batch_size", "16", "--micro_batch_size", "16", "--num_epochs", "3",
        "--logging_steps", "2", "--eval_steps", "3", "--report_to", "jsonl", "--device", "cpu",
    ]  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(argv)
    return RMRun(code, out.getvalue(), run_dir)


def ppo(work: Workdir, out: Path, *rewards: str, extra: tuple[str, ...] = ()) -> int:
    """``tether ppo`` for 2 steps of 8 episodes on the toy policy; one ``--reward`` per spec."""
    argv = ["ppo", "--policy", str(work.policy), "--prompts", str(work.prompts), "--output_dir", str(out)]
    for spec in rewards:
        argv += ["--reward", spec]
    argv += [
        "--total_episodes", "16", "--rollout_batch_size", "8", "--mini_batch_size", "4", "--micro_batch_size", "4",
        "--ppo_epochs", "1", "--learning_rate", "1e-3", "--sampling.max_new_tokens", "6", "--device", "cpu",
        "--logging.report_to", "jsonl", "--logging.progress_bar", "false", "--logging.sample_steps", "1",
        "--logging.save_steps", "0", "--logging.report", "false", *extra,
    ]  # fmt: skip
    return cli_main(argv)


def score_with_own_tokenizer(model_dir: Path, texts: list[str]) -> list[float]:
    """Reference scores, one text at a time through the model's own tokenizer and HF's forward (no tether)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts]


# -- tether rm ----------------------------------------------------------------------------------------------


def test_rm_trains_saves_a_loadable_model_and_writes_its_report(rm_run: RMRun) -> None:
    assert rm_run.exit_code == 0
    assert (rm_run.final / "config.json").is_file()
    metrics = read_jsonl(rm_run.run_dir / "metrics.jsonl")
    evals = [row["eval/accuracy"] for row in metrics if "eval/accuracy" in row]
    assert evals and evals[-1] >= 0.8  # at least 4 of the 5 held-out pairs
    report = rm_run.run_dir / "report.html"
    assert f"report:               {report}" in rm_run.stdout
    text = report.read_text()
    for key in ("train/loss", "eval/accuracy", "train/accuracy", "eval/margin_mean"):
        assert f'alt="plot: {key}"' in text, key
    assert 'alt="plot: objective/scores"' not in text  # no rollouts in a reward-model run
    assert "learning_rate: 0.003" in text  # its config.yaml


def test_rm_report_can_be_switched_off(work: Workdir, tmp_path: Path) -> None:
    argv = [
        "rm", "--model", str(work.policy), "--data", str(work.preferences), "--output_dir", str(tmp_path / "rm"),
        "--eval_fraction", "0", "--batch_size", "16", "--report_to", "none", "--report", "false",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    assert (tmp_path / "rm" / "final" / "config.json").is_file()
    assert not (tmp_path / "rm" / "report.html").exists()


def test_rm_refuses_a_second_run_and_resumes_from_the_run_directory_alone(
    work: Workdir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second ``tether rm`` into a run directory is refused; ``tether rm --resume DIR`` needs nothing else
    (config.yaml, and inputs.yaml with the paths made absolute) and ends where the uninterrupted run ended."""
    shutil.copytree(work.policy, tmp_path / "policy")
    shutil.copy(work.preferences, tmp_path / "prefs.jsonl")
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    # 48 pairs: 5 held out, 43 trained on in 3 steps of 16 per epoch; 2 epochs = 6 steps, a checkpoint at 4.
    argv = [
        "rm", "--model", "policy", "--data", "prefs.jsonl", "--output_dir", "rm", "--learning_rate", "3e-3",
        "--batch_size", "16", "--micro_batch_size", "16", "--num_epochs", "2", "--save_steps", "4",
        "--report_to", "jsonl", "--report", "false", "--device", "cpu",
    ]  # fmt: skip
    run = tmp_path / "rm"
    assert cli_main(argv) == 0
    full = [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(run / "metrics.jsonl")]
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    final = AutoModelForSequenceClassification.from_pretrained(run / "final").state_dict()
    capsys.readouterr()

    assert cli_main(argv) == 2  # it would append its metrics to the first run's
    assert "already holds a run" in capsys.readouterr().err
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the relative paths of the first command mean nothing here
    assert cli_main(["rm", "--resume", str(run)]) == 0
    assert f"resumed from {run / 'checkpoints' / 'step-000004'} (step 4)" in capsys.readouterr().out
    assert not list((tmp_path / "elsewhere").iterdir())  # output_dir defaults to the resumed run
    # steps 5 and 6 again, from the checkpoint: the same records (no duplicates) and the same final model
    assert [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(run / "metrics.jsonl")] == full
    resumed = AutoModelForSequenceClassification.from_pretrained(run / "final").state_dict()
    for key, value in final.items():
        assert torch.equal(resumed[key], value), key


# -- tether ppo with rewards --------------------------------------------------------------------------------


def test_ppo_with_trained_reward_model_from_path(work: Workdir, rm_run: RMRun, tmp_path: Path) -> None:
    assert rm_run.exit_code == 0
    out = tmp_path / "ppo"
    assert ppo(work, out, str(rm_run.final)) == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in metrics] == [1, 2]
    assert all(math.isfinite(row["objective/scores"]) for row in metrics)
    assert (out / "final" / "config.json").is_file()
    # The logged scores are the trained model's scores of prompt + response (not a default or a zero).
    samples = read_jsonl(out / "samples.jsonl")
    expected = score_with_own_tokenizer(rm_run.final, [s["prompt"] + s["response"] for s in samples])
    assert [s["score"] for s in samples] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_ppo_composed_reward_is_the_weighted_sum_of_its_components(
    work: Workdir, rm_run: RMRun, tmp_path: Path
) -> None:
    out = tmp_path / "ppo"
    specs = (str(rm_run.final), f"{work.rewards}:vowels")
    assert ppo(work, out, *specs, extra=("--reward_weights", "1.0,0.5")) == 0
    rm_name = rm_run.final.parent.name  # a reward model in RUN/final is named after its run directory
    for row in read_jsonl(out / "metrics.jsonl"):
        means = {k for k in row if k.startswith("rewards/") and k.endswith("/mean")}
        assert means == {f"rewards/{rm_name}/mean", "rewards/vowels/mean"}
        weighted = 1.0 * row[f"rewards/{rm_name}/mean"] + 0.5 * row["rewards/vowels/mean"]
        assert row["objective/scores"] == pytest.approx(weighted, rel=1e-5, abs=1e-6)
        assert row["rewards/vowels/mean"] != 0.0 and row[f"rewards/{rm_name}/mean"] != 0.0


def test_ppo_prompt_baseline_from_the_cli_zeroes_a_prompt_only_reward(work: Workdir, tmp_path: Path) -> None:
    out = tmp_path / "ppo"
    assert ppo(work, out, f"{work.rewards}:prompt_only", extra=("--reward_baseline", "prompt")) == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 2
    for row in metrics:
        # r(prompt + response) - r(prompt) for a reward of the prompt alone: exactly 0, every row.
        assert row["objective/scores"] == 0.0
        assert row["objective/scores_std"] == 0.0
        assert row["rewards/prompt_only/mean"] == 0.0
    assert all(s["score"] == 0.0 for s in read_jsonl(out / "samples.jsonl"))


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer over the toy alphabet: other ids, ``##`` pieces, [CLS] ... [SEP]."""
    letters = sorted(set(TOY_ALPHABET) - {" "})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    pieces = [f"##{c}" for c in string.ascii_lowercase] + ["ou", "ea", "##ou"]
    vocab = {t: i for i, t in enumerate(specials + letters + pieces)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def test_ppo_with_reward_model_whose_tokenizer_differs_from_the_policy(work: Workdir, tmp_path: Path) -> None:
    rm_tok = wordpiece_tokenizer()
    policy_tok = AutoTokenizer.from_pretrained(work.policy)
    assert rm_tok.get_vocab() != policy_tok.get_vocab()
    assert rm_tok("you")["input_ids"] != policy_tok("you")["input_ids"]
    rm_dir = tmp_path / "bert_rm"
    tiny_bert_rm(rm_tok, seed=3).save_pretrained(rm_dir)
    rm_tok.save_pretrained(rm_dir)

    out = tmp_path / "ppo"
    assert ppo(work, out, str(rm_dir)) == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 2 and all(math.isfinite(row["objective/scores"]) for row in metrics)
    assert (out / "final" / "config.json").is_file()
    # Each decoded response was re-tokenised by the reward model's own tokenizer.
    samples = read_jsonl(out / "samples.jsonl")
    texts = [s["prompt"] + s["response"] for s in samples]
    expected = score_with_own_tokenizer(rm_dir, texts)
    assert [s["score"] for s in samples] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert len(set(expected)) > 1  # the model tells the texts apart, so the comparison means something


# -- tether check-reward ------------------------------------------------------------------------------------


def test_check_reward_flags_a_length_biased_reward(
    work: Workdir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(4)
    rows = [
        {"prompt": p, "response": " " + vowel_word(rng, 0.5)[: rng.randint(1, 8)] * rng.randint(1, 3)}
        for p in make_toy_prompts(24, seed=2)
    ]
    data = tmp_path / "samples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "check"
    code = cli_main(
        ["check-reward", "--reward", f"{work.rewards}:longer", "--data", str(data), "--out", str(out)]
    )
    assert code == 1  # 1 = warnings found
    printed = capsys.readouterr().out
    assert "scores of 24 samples: mean" in printed
    assert re.search(r"^  min [-\d.]+  p05 .* max [-\d.]+$", printed, re.M)  # the quantile row
    printed_r = re.search(r"correlation with response length: ([+-][\d.]+)", printed)
    assert printed_r is not None and float(printed_r.group(1)) > 0.9
    assert "score correlates with response length" in printed
    report = json.loads((out / "check_reward.json").read_text())
    assert report["distribution"]["count"] == 24
    assert report["length_correlation"] > 0.9
    assert any("response length" in w and "longer" in w for w in report["warnings"])
    assert (out / "score_vs_length.png").is_file()
