"""RewardTrainer: learning on a synthetic preference set, micro-batch invariance, outputs, bad input, CLI."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from test_rewards_helpers import bert_tokenizer, gpt_tokenizer, tiny_bert_rm, tiny_gpt2_lm, tiny_gpt2_rm
from transformers import AutoModelForSequenceClassification

from tether.config import ConfigError, load_config
from tether.data import DataError
from tether.logging import read_jsonl
from tether.rewards import RewardError, bradley_terry_loss, build_reward
from tether.rewards.data import load_preferences
from tether.train_cli import rm_main as main
from tether.trainers import reward as reward_module
from tether.trainers.reward import (
    RewardConfig,
    RewardTrainer,
    accumulate_gradients,
    clip_gradients,
    score_pairs,
)

FILLERS = ["the", "cat", "dog", "sat", "on", "mat", "a", "b", "c"]


def synthetic_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """The chosen response always holds 1-3 more 'good' words than the rejected one."""
    rng = random.Random(seed)

    def response(n_good: int) -> str:
        words = rng.choices(FILLERS, k=rng.randint(4, 8)) + ["good"] * n_good
        rng.shuffle(words)
        return " " + " ".join(words)

    rows = []
    for _ in range(n):
        base = rng.randint(0, 2)
        rows.append(
            {
                "prompt": " ".join(rng.choices(FILLERS, k=3)),
                "chosen": response(base + rng.randint(1, 3)),
                "rejected": response(base),
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def quick_config(tmp_path: Path, **overrides: object) -> RewardConfig:
    kwargs: dict[str, object] = dict(
        output_dir=str(tmp_path / "run"),
        learning_rate=1e-3,
        batch_size=16,
        micro_batch_size=8,
        report_to=["none"],
        num_epochs=1,
        logging_steps=5,
    )
    kwargs.update(overrides)
    return RewardConfig(**kwargs)  # type: ignore[arg-type]


def test_learns_synthetic_preferences(tmp_path: Path) -> None:
    tok = gpt_tokenizer()
    cfg = quick_config(tmp_path, num_epochs=2, logging_steps=10, save_steps=25, eval_steps=25)
    trainer = RewardTrainer(
        cfg,
        model=tiny_gpt2_lm(tok),
        tokenizer=tok,
        train_data=synthetic_pairs(400, 0),
        eval_data=synthetic_pairs(200, 1),
    )
    history = trainer.train()
    final = history[-1]
    assert final["step"] == 50  # 2 epochs x 400 / 16
    assert final["eval/accuracy"] > 0.9
    assert final["eval/margin_mean"] > 0.5
    assert history[0]["train/accuracy"] < final["eval/accuracy"]
    run = Path(cfg.output_dir)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [r["step"] for r in history]
    for key in ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "eval/margin_mean"):
        assert key in lines[-1]
    assert (run / "config.yaml").is_file()
    # the model of a checkpoint lives in its policy/ folder, as the RL trainers' do (tether.checkpoint)
    assert (run / "checkpoints" / "step-000025" / "policy" / "config.json").is_file()
    # final/ is a reward model build_reward can load, and it ranks a held-out pair the right way round
    reward = build_reward(str(run / "final"))
    out = reward(["the cat"], [" good good good on the mat"])
    worse = reward(["the cat"], [" a dog sat on the mat"])
    assert out.scores.item() > worse.scores.item()


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_micro_batching_does_not_change_the_gradient(tmp_path: Path) -> None:
    # 7 pairs: micro-batches of 2 (2 + 2 + 2 + 1, a short last one) and of 3 must give the gradient of the
    # plain mean Bradley-Terry loss over all 7 pairs computed in one forward. (Compared on gradients, not on
    # parameters after an AdamW step: Adam's step is invariant to a constant gradient scale, so it would hide
    # a wrong micro-batch weighting.)
    tok = gpt_tokenizer()
    trainer = RewardTrainer(
        quick_config(tmp_path, eval_fraction=0.0),
        model=tiny_gpt2_rm(tok, seed=5),
        tokenizer=tok,
        train_data=synthetic_pairs(7, 3),
    )
    model, rows = trainer.model, list(range(7))
    out = score_pairs(model, trainer.train_pairs, rows, trainer.pad_id)
    reference = bradley_terry_loss(out.chosen, out.rejected)
    reference.loss.backward()
    expected = _grads(model)
    for micro in (2, 3, 7):
        model.zero_grad(set_to_none=True)
        stats = accumulate_gradients(model, trainer.train_pairs, rows, micro, trainer.pad_id)
        assert torch.allclose(_grads(model), expected, atol=1e-6, rtol=1e-5), micro
        assert stats.loss == pytest.approx(reference.loss.item(), abs=1e-6)
        assert stats.accuracy == pytest.approx(reference.accuracy.item())
    assert expected.abs().max() > 1e-3


def test_causal_lm_becomes_reward_model_with_its_backbone(tmp_path: Path) -> None:
    tok = gpt_tokenizer()
    lm = tiny_gpt2_lm(tok)
    trainer = RewardTrainer(
        quick_config(tmp_path), model=lm, tokenizer=tok, train_data=synthetic_pairs(20, 0)
    )
    assert trainer.model.config.num_labels == 1
    assert torch.equal(trainer.model.transformer.wte.weight, lm.transformer.wte.weight)
    assert trainer.model.config.pad_token_id == tok.eos_token_id


def test_encoder_reward_model_and_margin_and_split(tmp_path: Path) -> None:
    tok = bert_tokenizer()
    rows = [{**r, "margin": 0.5} for r in synthetic_pairs(40, 2)]
    cfg = quick_config(tmp_path, use_margin=True, eval_fraction=0.25)
    trainer = RewardTrainer(cfg, model=tiny_bert_rm(tok), tokenizer=tok, train_data=rows)
    assert len(trainer.train_pairs.chosen) == 30 and trainer.eval_pairs is not None
    assert len(trainer.eval_pairs.chosen) == 10
    assert trainer.train_pairs.margins == [0.5] * 30
    history = trainer.train()
    assert "eval/accuracy" in history[-1]


def test_full_text_layout_csv_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    rows = [
        {"chosen": "the cat sat good", "rejected": "the cat sat"},
        {"chosen": "a good", "rejected": "a bad"},
    ]
    table = pa.Table.from_pylist(rows)
    pyarrow.csv.write_csv(table, tmp_path / "p.csv")
    pyarrow.parquet.write_table(table, tmp_path / "p.parquet")
    for name in ("p.csv", "p.parquet"):
        data = load_preferences(str(tmp_path / name))
        assert data.prompts == ["", ""] and data.chosen_texts == ["the cat sat good", "a good"]


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([{"prompt": "p", "chosen": "a"}], r"bad.jsonl, row 0: missing column\(s\) 'rejected'"),
        (
            [
                {"prompt": "p", "chosen": "a", "rejected": "b"},
                {"prompt": "p", "chosen": " ", "rejected": "b"},
            ],
            r"bad.jsonl, row 1: 'chosen' is empty",
        ),
        (
            [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2
            + [{"prompt": "p", "chosen": "same", "rejected": "same"}],
            r"bad.jsonl, row 2: 'chosen' and 'rejected' are identical",
        ),
        (
            [{"prompt": "p", "chosen": [{"role": "user"}], "rejected": "b"}],
            r"row 0: 'chosen' must be a string",
        ),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path: Path, rows: list[dict[str, object]], pattern: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=pattern):
        load_preferences(path)


def test_margin_required_and_checked(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"chosen": "a", "rejected": "b", "margin": "big"}])
    with pytest.raises(DataError, match=r"m.jsonl, row 0: 'margin' must be a finite number, got 'big'"):
        load_preferences(path, use_margin=True)
    path = write_jsonl(tmp_path / "n.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"n.jsonl, row 0: missing column\(s\) 'margin'"):
        load_preferences(path, use_margin=True)


def test_text_longer_than_context_names_file_and_row(tmp_path: Path) -> None:
    tok = gpt_tokenizer()
    rows = synthetic_pairs(3, 0)
    rows[2]["rejected"] = " " + " ".join(["a"] * 80)  # the model's context is 64 positions
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(
        RewardError, match=r"long.jsonl 'rejected': text at row 2 has 83 tokens.*context of 64"
    ):
        RewardTrainer(quick_config(tmp_path), model=tiny_gpt2_lm(tok), tokenizer=tok, train_data=path)
    # with max_length set it is truncated instead
    trainer = RewardTrainer(
        quick_config(tmp_path, max_length=16, eval_fraction=0.0),
        model=tiny_gpt2_lm(tok),
        tokenizer=tok,
        train_data=path,
    )
    assert len(trainer.train_pairs.rejected[2]) == 16


def test_two_label_model_is_refused(tmp_path: Path) -> None:
    tok = bert_tokenizer()
    with pytest.raises(RewardError, match=r"reward model 'BertForSequenceClassification' has num_labels=2"):
        RewardTrainer(
            quick_config(tmp_path),
            model=tiny_bert_rm(tok, num_labels=2),
            tokenizer=tok,
            train_data=synthetic_pairs(4, 0),
        )


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        RewardConfig(batch_size=10, micro_batch_size=4)
    assert RewardConfig(batch_size=16, micro_batch_size=4).gradient_accumulation_steps == 4
    with pytest.raises(ConfigError, match="save_total_limit must be positive"):
        RewardConfig(save_total_limit=0)


def test_max_grad_norm_none_disables_clipping_and_a_non_positive_value_is_an_error() -> None:
    # The same meaning as RLConfig.max_grad_norm: a norm, or None (null) for no clipping. 0 no longer disables.
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError, match=r"max_grad_norm must be > 0, got .*use null"):
            RewardConfig(max_grad_norm=bad)
    assert load_config(RewardConfig, ["--max_grad_norm", "none"])[0].max_grad_norm is None
    assert load_config(RewardConfig, ["--max_grad_norm", "0.5"])[0].max_grad_norm == 0.5
    # clip_gradients returns the norm before clipping; gradient (3, 4) has norm 5.
    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients([weight], None) == pytest.approx(5.0)
    assert torch.equal(weight.grad, torch.tensor([3.0, 4.0]))  # None: untouched
    assert clip_gradients([weight], 1.0) == pytest.approx(5.0)
    assert torch.allclose(weight.grad, torch.tensor([0.6, 0.8]), atol=1e-6)  # scaled to norm 1


def test_metrics_every_step_and_the_console_every_logging_steps_and_at_evaluations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # logging_steps means what it means in the RL trainers: metrics.jsonl gets every optimiser step, the
    # console prints every logging_steps steps (and rm also prints each evaluation when it runs).
    clip_args: list[float | None] = []
    real_clip = reward_module.clip_gradients

    def spy_clip(params, max_norm):  # type: ignore[no-untyped-def]
        clip_args.append(max_norm)
        return real_clip(params, max_norm)

    monkeypatch.setattr(reward_module, "clip_gradients", spy_clip)
    tok = gpt_tokenizer()
    cfg = quick_config(
        tmp_path, batch_size=4, micro_batch_size=4, eval_fraction=0.2, eval_steps=4, logging_steps=3,
        report_to=["console"], max_grad_norm=None, report=False,
    )  # fmt: skip
    # 35 pairs: 7 held out, 28 trained on in 7 steps of 4; evaluations at steps 4 and 7 (the last)
    RewardTrainer(cfg, model=tiny_gpt2_lm(tok), tokenizer=tok, train_data=synthetic_pairs(35, 0)).train()
    records = read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    for r in records:
        step = r["step"]
        # the rate the step used: linear decay from 1e-3 to 0 over 7 steps
        assert r["train/learning_rate"] == pytest.approx(1e-3 * (1 - (step - 1) / 7))
        assert r["train/epoch"] == pytest.approx(step / 7)
        assert 0.0 <= r["train/accuracy"] <= 1.0 and r["train/loss"] > 0.0
        assert 0.0 < r["train/grad_norm"] < float("inf")  # measured also when clipping is off (was NaN)
        assert ("eval/accuracy" in r) == (step in (4, 7))
    assert clip_args == [None] * 7  # the config's max_grad_norm reaches the clipping
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [int(line.split()[1]) for line in printed] == [3, 4, 6, 7]
    assert all(" loss " in line and " acc " in line for line in printed)  # rm's CONSOLE_KEYS
    assert [" eval_acc " in line for line in printed] == [False, True, False, True]


def test_a_second_run_into_the_same_output_dir_is_refused_unless_overwritten(tmp_path: Path) -> None:
    tok = gpt_tokenizer()
    run_dir = tmp_path / "run"

    def train(**overrides: object) -> None:
        cfg = quick_config(
            tmp_path, batch_size=4, micro_batch_size=4, eval_fraction=0.0, report=False, **overrides
        )
        RewardTrainer(cfg, model=tiny_gpt2_lm(tok), tokenizer=tok, train_data=synthetic_pairs(8, 0)).train()

    train()
    first = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in first] == [1, 2]
    with pytest.raises(
        ConfigError, match=r"already holds a run \(metrics\.jsonl, .*final\).*overwrite_output_dir"
    ):
        train()
    assert read_jsonl(run_dir / "metrics.jsonl") == first  # the refused run wrote nothing
    train(overwrite_output_dir=True, num_epochs=2)
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]  # the new run alone


def stable(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """Metrics records without the wall-clock ``time`` field, which differs between runs by nature."""
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def resumable_trainer(tmp_path: Path, name: str) -> RewardTrainer:
    """12 pairs: 2 held out, 10 trained on in 2 steps of 6 and 4 pairs (micro-batches 3 + 3, 3 + 1) per epoch;
    3 epochs = 6 steps. Checkpoints at steps 3 and 6 (one kept); evaluations at the end of each epoch (steps 2,
    4, 6). Dropout stays on, so the run also depends on the global RNG state, which resume must restore.
    """
    tok = gpt_tokenizer()
    cfg = quick_config(
        tmp_path, output_dir=str(tmp_path / name), batch_size=6, micro_batch_size=3, num_epochs=3,
        eval_fraction=0.2, save_steps=3, save_total_limit=1, disable_dropout=False, report=False,
    )  # fmt: skip
    return RewardTrainer(cfg, model=tiny_gpt2_lm(tok), tokenizer=tok, train_data=synthetic_pairs(12, 4))


def test_resume_equals_an_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = resumable_trainer(tmp_path, "full")
    full_history = full.train()

    interrupted = resumable_trainer(tmp_path, "cut")
    real_checkpoint, real_accumulate = interrupted._checkpoint, reward_module.accumulate_gradients
    at_checkpoint: dict[str, torch.Tensor] = {}

    def checkpoint_remembering_the_weights() -> Path:
        at_checkpoint.update({k: v.clone() for k, v in interrupted.model.state_dict().items()})
        return real_checkpoint()

    def die_in_step_5(*args, **kwargs):  # type: ignore[no-untyped-def]
        # The process dies in step 5: step 4, past the step-3 checkpoint (mid second epoch, 6 of its 10 rows
        # done), is already in metrics.jsonl, and the third epoch's order has been drawn.
        if interrupted.step == 4:
            raise KeyboardInterrupt
        return real_accumulate(*args, **kwargs)

    interrupted._checkpoint = checkpoint_remembering_the_weights  # type: ignore[method-assign]
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(reward_module, "accumulate_gradients", die_in_step_5)
        interrupted.train()
    cut = tmp_path / "cut"
    assert [r["step"] for r in read_jsonl(cut / "metrics.jsonl")] == [1, 2, 3, 4]
    # the checkpoint's model is a save_pretrained directory holding the weights of step 3
    saved = AutoModelForSequenceClassification.from_pretrained(cut / "checkpoints" / "step-000003" / "policy")
    assert at_checkpoint.keys() == saved.state_dict().keys()
    for key, value in at_checkpoint.items():
        assert torch.equal(saved.state_dict()[key], value), key

    resumed = resumable_trainer(tmp_path, "cut")
    assert resumed.resume().name == "step-000003" and resumed.step == 3
    rest = resumed.train()

    assert stable(rest) == stable(full_history[3:])  # type: ignore[arg-type]
    full_records = stable(read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    assert [r["step"] for r in full_records] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in full_records if "eval/accuracy" in r] == [2, 4, 6]
    # step 4 logged once (the interrupted run's line was dropped), nothing lost, every value the same
    assert stable(read_jsonl(cut / "metrics.jsonl")) == full_records
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    for run in (tmp_path / "full", cut):  # save_total_limit=1 keeps the newest
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000006"]


def test_cli_trains_normalises_and_rejects_unknown_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = gpt_tokenizer()
    model_dir = tmp_path / "lm"
    tiny_gpt2_lm(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "prefs.jsonl", synthetic_pairs(32, 0))
    samples = [{"prompt": r["prompt"], "response": r["chosen"]} for r in synthetic_pairs(12, 9)]
    samples_path = write_jsonl(tmp_path / "samples.jsonl", samples)  # type: ignore[arg-type]
    out = tmp_path / "out"
    argv = [
        "--model",
        str(model_dir),
        "--data",
        data,
        "--output-dir",
        str(out),
        "--report_to",
        "none",
        "--learning_rate",
        "1e-3",
        "--normalize_data",
        samples_path,
    ]
    assert main(argv) == 0
    scores = build_reward(str(out / "final"))(
        [s["prompt"] for s in samples], [s["response"] for s in samples]
    ).scores
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-4)
    assert main(argv + ["--learning_rat", "1"]) == 2
    assert "unknown config key(s) learning_rat" in capsys.readouterr().err
    assert main(["--data", data]) == 2
    assert os.path.isfile(out / "config.yaml")
