"""Reward-model training on pairwise preferences (Bradley–Terry), the loop behind ``tether rm``.

One loop, top to bottom: batch of pairs -> micro-batches (chosen and rejected in one forward) -> Bradley–Terry
loss scaled by the micro-batch's share of the batch -> clip, step -> log / evaluate / checkpoint. The score is
read at the last valid token by :func:`tether.rewards.model.sequence_scores`, the same function that scores
rollouts, so training and use cannot disagree on where a text's reward lives.

Batch vocabulary (TRL names in brackets): ``batch_size`` pairs per optimiser step
[per_device_train_batch_size * gradient_accumulation_steps], ``micro_batch_size`` pairs per forward/backward
[per_device_train_batch_size]; ``gradient_accumulation_steps`` is derived.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tether.checkpoint import save_pretrained_atomic
from tether.config import ConfigError, config_help, load_config, save_yaml, to_dict
from tether.data import DataError
from tether.logging import ConsoleLogger, MultiLogger, build_loggers
from tether.models import disable_dropout, pick_device
from tether.report import build_report
from tether.rewards.base import RewardError
from tether.rewards.data import PreferenceData, load_preferences, load_samples, split_indices
from tether.rewards.losses import bradley_terry_loss
from tether.rewards.model import (
    as_trainable_reward_model,
    encode_texts,
    model_name,
    pad_id_of,
    pad_right,
    sequence_scores,
    token_limit,
)
from tether.rewards.normalize import normalize_reward_model


@dataclass
class RewardConfig:
    """Reward-model training. Every field is read; ``tether rm --field value`` overrides any of them."""

    model: str | None = None
    """Path of a one-label sequence-classification model or a causal LM (a new score head is added)."""
    data: str | None = None
    """Preference file (.jsonl/.csv/.parquet): prompt, chosen, rejected[, margin] or chosen, rejected."""
    eval_data: str | None = None
    """Held-out preference file; when absent, eval_fraction of data is held out."""
    output_dir: str = "runs/reward"
    """Run directory: metrics.jsonl, config.yaml, checkpoints/step-N, final/, report.html."""
    seed: int = 0
    """Seeds the new score head, the shuffling and the eval split."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda, cuda:1 ..."""
    learning_rate: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler: Literal["constant", "linear"] = "linear"
    """linear decays the learning rate to 0 at the last step (TRL's default)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip per optimiser step (0 disables)."""
    num_epochs: int = 1
    """Passes over the training pairs."""
    batch_size: int = 16
    """Pairs per optimiser step (TRL: per_device_train_batch_size * gradient_accumulation_steps)."""
    micro_batch_size: int = 8
    """Pairs per forward/backward (TRL: per_device_train_batch_size); must divide batch_size."""
    max_length: int | None = None
    """Token limit per text; longer texts are cut from the left. None: the model's context, longer is an error."""
    eval_fraction: float = 0.1
    """Share of data held out for evaluation when eval_data is not given (0 disables evaluation)."""
    use_margin: bool = False
    """Read a 'margin' column and train on -logsigmoid(r_chosen - r_rejected - margin) (Llama 2)."""
    disable_dropout: bool = True
    """Dropout off during training, as TRL's RewardTrainer does: a reward model is read with dropout off."""
    logging_steps: int = 10
    """Write train/* metrics every N optimiser steps (and at the last step)."""
    eval_steps: int = 0
    """Evaluate every N optimiser steps; 0 evaluates at the end of every epoch."""
    save_steps: int = 0
    """Write checkpoints/step-N every N optimiser steps (0: only final/)."""
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "console"])
    """Logging backends: jsonl (always on), console, tensorboard, wandb, none."""
    report: bool = True
    """Write output_dir/report.html (loss, accuracy and margin curves; config) at the end of training."""
    normalize_data: str | None = None
    """File of reference-policy samples (prompt, response): after training, set the reward's gain/bias so
    these score mean 0 / std 1 (OpenAI lm-human-preferences); stored in the saved model's config."""

    def __post_init__(self) -> None:
        positive = ("learning_rate", "num_epochs", "batch_size", "micro_batch_size", "logging_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_steps < 0 or self.save_steps < 0 or self.max_grad_norm < 0:
            raise ConfigError("eval_steps, save_steps and max_grad_norm must be >= 0")

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimiser step."""
        return self.batch_size // self.micro_batch_size


class EncodedPairs(NamedTuple):
    """Token ids of B pairs: [B] lists of ids each, and [B] margins or None."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    margins: list[float] | None


class PairScores(NamedTuple):
    """Scores of a micro-batch of m pairs: [m] chosen, [m] rejected, [m] margins or None."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    margins: torch.Tensor | None


def encode_pairs(
    data: PreferenceData, tokenizer: PreTrainedTokenizerBase, limit: int | None, truncate: bool
) -> EncodedPairs:
    """Tokenise every pair once, up front, so that a bad row fails before training, named by file and row."""
    chosen = encode_texts(
        tokenizer, data.chosen_texts, limit=limit, truncate=truncate, where=f"{data.source} 'chosen'"
    )
    rejected = encode_texts(
        tokenizer, data.rejected_texts, limit=limit, truncate=truncate, where=f"{data.source} 'rejected'"
    )
    for i, (good, bad) in enumerate(zip(chosen, rejected, strict=True)):
        if good == bad:
            raise DataError(
                f"{data.source}, row {i}: 'chosen' and 'rejected' are identical after tokenisation"
            )
    return EncodedPairs(chosen, rejected, data.margins)


def score_pairs(model: PreTrainedModel, pairs: EncodedPairs, rows: Sequence[int], pad_id: int) -> PairScores:
    """Score the pairs at ``rows``: chosen and rejected go through one forward of 2m right-padded texts."""
    texts = [pairs.chosen[i] for i in rows] + [pairs.rejected[i] for i in rows]
    input_ids, mask = pad_right(texts, pad_id)  # [2m, T]
    device = next(model.parameters()).device
    scores = sequence_scores(model, input_ids.to(device), mask.to(device))  # [2m]
    margins = None
    if pairs.margins is not None:
        margins = torch.tensor([pairs.margins[i] for i in rows], dtype=torch.float32, device=device)
    return PairScores(scores[: len(rows)], scores[len(rows) :], margins)


def evaluate(
    model: PreTrainedModel, pairs: EncodedPairs, micro_batch_size: int, pad_id: int
) -> dict[str, float]:
    """``eval/loss``, ``eval/accuracy`` and ``eval/margin_mean`` (mean r_chosen - r_rejected) over all pairs."""
    was_training = model.training
    model.eval()
    chosen, rejected, margins = [], [], []
    with torch.inference_mode():
        for start in range(0, len(pairs.chosen), micro_batch_size):
            out = score_pairs(
                model, pairs, range(start, min(start + micro_batch_size, len(pairs.chosen))), pad_id
            )
            chosen.append(out.chosen)
            rejected.append(out.rejected)
            if out.margins is not None:
                margins.append(out.margins)
    model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    result = bradley_terry_loss(c, r, torch.cat(margins) if margins else None)
    return {
        "eval/loss": result.loss.item(),
        "eval/accuracy": result.accuracy.item(),
        "eval/margin_mean": (c - r).mean().item(),
    }


class StepStats(NamedTuple):
    """Mean Bradley–Terry loss and accuracy over the pairs of one optimiser step."""

    loss: float
    accuracy: float


def accumulate_gradients(
    model: PreTrainedModel, pairs: EncodedPairs, rows: Sequence[int], micro_batch_size: int, pad_id: int
) -> StepStats:
    """Backpropagate the mean Bradley–Terry loss over ``rows`` in micro-batches of ``micro_batch_size`` pairs.

    Each micro-batch's mean loss is weighted by its share of the rows, so ``.grad`` ends up holding the gradient
    of the mean over all rows whatever the micro-batch size, also when the last micro-batch is shorter.
    """
    loss_sum = correct_sum = 0.0
    for start in range(0, len(rows), micro_batch_size):
        micro = rows[start : start + micro_batch_size]
        out = score_pairs(model, pairs, micro, pad_id)
        result = bradley_terry_loss(out.chosen, out.rejected, out.margins)
        (result.loss * (len(micro) / len(rows))).backward()
        loss_sum += result.loss.item() * len(micro)
        correct_sum += result.accuracy.item() * len(micro)
    return StepStats(loss=loss_sum / len(rows), accuracy=correct_sum / len(rows))


class RewardTrainer:
    """Train a one-output reward model on preference pairs (see the module docstring).

    ``model`` and ``train_data``/``eval_data`` default to ``config.model``/``config.data``/``config.eval_data``;
    ``tokenizer`` defaults to the one saved with a model path (required with a model instance).
    """

    def __init__(
        self,
        config: RewardConfig,
        model: str | PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        train_data: Any = None,
        eval_data: Any = None,
    ) -> None:
        self.config = cfg = config
        self.report_path: Path | None = None  # run_dir/report.html once train() has written it
        torch.manual_seed(cfg.seed)  # a causal LM gets a new, seeded score head
        source = model if model is not None else cfg.model
        if source is None:
            raise ConfigError("no model: pass model=... or set config.model")
        self.device = pick_device(cfg.device)
        self.model = as_trainable_reward_model(source).to(self.device)
        if tokenizer is None:
            if not isinstance(source, str):
                raise ConfigError(f"pass tokenizer=... with the model instance {model_name(source)!r}")
            tokenizer = AutoTokenizer.from_pretrained(source)
        self.tokenizer = tokenizer
        if self.model.config.pad_token_id is None:  # lets HF's own forward batch the saved model
            self.model.config.pad_token_id = pad_id_of(tokenizer)
        if cfg.disable_dropout:
            disable_dropout(self.model)
        self.pad_id = pad_id_of(tokenizer)

        train_source = train_data if train_data is not None else cfg.data
        if train_source is None:
            raise ConfigError("no training data: pass train_data=... or set config.data")
        limit = token_limit(self.model, tokenizer, cfg.max_length)
        truncate = cfg.max_length is not None
        train = self._as_preferences(train_source)
        all_train = encode_pairs(train, tokenizer, limit, truncate)
        eval_source = eval_data if eval_data is not None else cfg.eval_data
        self.eval_pairs: EncodedPairs | None = None
        if eval_source is not None:
            self.train_pairs = all_train
            self.eval_pairs = encode_pairs(self._as_preferences(eval_source), tokenizer, limit, truncate)
        elif cfg.eval_fraction > 0:
            train_rows, eval_rows = split_indices(len(train), cfg.eval_fraction, cfg.seed)
            self.train_pairs, self.eval_pairs = _select(all_train, train_rows), _select(all_train, eval_rows)
        else:
            self.train_pairs = all_train

    def _as_preferences(self, source: Any) -> PreferenceData:
        if isinstance(source, PreferenceData):
            if self.config.use_margin and source.margins is None:
                raise DataError(f"{source.source}: use_margin is set but the data has no margins")
            return source
        return load_preferences(source, use_margin=self.config.use_margin)

    def train(self) -> list[dict[str, float]]:
        """Run the training loop; returns every logged metrics record (each with a ``"step"`` key)."""
        cfg, model = self.config, self.model
        run_dir = Path(cfg.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
        loggers = _loggers(cfg, run_dir)
        n_train = len(self.train_pairs.chosen)
        steps_per_epoch = math.ceil(n_train / cfg.batch_size)
        total_steps = cfg.num_epochs * steps_per_epoch
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        linear = cfg.lr_scheduler == "linear"
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 1.0 - s / total_steps if linear else 1.0
        )
        generator = torch.Generator().manual_seed(cfg.seed)
        history: list[dict[str, float]] = []
        window: list[tuple[float, float]] = []  # (loss, accuracy) per step since the last log
        step = 0
        model.train()
        try:
            for _epoch in range(cfg.num_epochs):
                order = torch.randperm(n_train, generator=generator).tolist()
                for start in range(0, n_train, cfg.batch_size):
                    step += 1
                    # 1. the pairs of this optimiser step
                    batch = order[start : start + cfg.batch_size]
                    # 2. forward/backward in micro-batches (gradients accumulate in .grad)
                    stats = accumulate_gradients(
                        model, self.train_pairs, batch, cfg.micro_batch_size, self.pad_id
                    )
                    # 3. update
                    grad_norm = (
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
                        if cfg.max_grad_norm > 0
                        else float("nan")
                    )
                    learning_rate = optimizer.param_groups[0]["lr"]  # the rate this step used
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    window.append((stats.loss, stats.accuracy))
                    # 4. log / evaluate / checkpoint
                    last = step == total_steps
                    metrics: dict[str, float] = {}
                    if step % cfg.logging_steps == 0 or last:
                        metrics.update(
                            {
                                "train/loss": sum(w[0] for w in window) / len(window),
                                "train/accuracy": sum(w[1] for w in window) / len(window),
                                "train/grad_norm": grad_norm,
                                "train/learning_rate": learning_rate,
                                "train/epoch": step / steps_per_epoch,
                            }
                        )
                        window.clear()
                    end_of_epoch = start + cfg.batch_size >= n_train
                    eval_due = step % cfg.eval_steps == 0 if cfg.eval_steps else end_of_epoch
                    if self.eval_pairs is not None and (eval_due or last):
                        metrics.update(evaluate(model, self.eval_pairs, cfg.micro_batch_size, self.pad_id))
                    if metrics:
                        loggers.log_metrics(metrics, step)
                        history.append({"step": step, **metrics})
                    if cfg.save_steps and step % cfg.save_steps == 0:
                        save_pretrained_atomic(
                            model, self.tokenizer, run_dir / "checkpoints" / f"step-{step:06d}"
                        )
            # 5. normalise on reference-policy samples (optional), then save final/
            if cfg.normalize_data is not None:
                prompts, responses, _ = load_samples(cfg.normalize_data)
                gain, bias = normalize_reward_model(
                    model,
                    self.tokenizer,
                    prompts,
                    responses,
                    batch_size=cfg.micro_batch_size,
                    max_length=cfg.max_length,
                )
                loggers.log_metrics({"normalize/gain": gain, "normalize/bias": bias}, step)
                history.append({"step": step, "normalize/gain": gain, "normalize/bias": bias})
            save_pretrained_atomic(model, self.tokenizer, run_dir / "final")
        finally:
            loggers.close()
        if cfg.report:  # after close(): the report reads the flushed metrics.jsonl
            self.report_path = build_report([run_dir])
        return history


#: The console line of ``tether rm`` (the default console keys are the RL ones).
CONSOLE_KEYS = {
    "train/loss": "loss",
    "train/accuracy": "acc",
    "eval/loss": "eval_loss",
    "eval/accuracy": "eval_acc",
    "eval/margin_mean": "eval_margin",
}


def _loggers(cfg: RewardConfig, run_dir: Path) -> MultiLogger:
    backends = [name for name in cfg.report_to if name != "console"]
    loggers = build_loggers(backends, run_dir, to_dict(cfg))
    if "console" in cfg.report_to:
        return MultiLogger([*loggers.loggers, ConsoleLogger(keys=CONSOLE_KEYS)])
    return loggers


def _select(pairs: EncodedPairs, rows: Sequence[int]) -> EncodedPairs:
    return EncodedPairs(
        chosen=[pairs.chosen[i] for i in rows],
        rejected=[pairs.rejected[i] for i in rows],
        margins=None if pairs.margins is None else [pairs.margins[i] for i in rows],
    )


_USAGE = """usage: tether rm [--config FILE.yaml] --model PATH --data FILE [--eval-data FILE] [--output_dir DIR]
                 [--FIELD VALUE ...]

Train a reward model on preference pairs. Any RewardConfig field can be set with --FIELD VALUE:"""


def main(argv: list[str] | None = None) -> int:
    """``tether rm``: train a reward model; returns the exit status (0 ok, 2 bad arguments or data)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(_USAGE)
        print("\n".join(config_help(RewardConfig)))
        return 0
    try:
        config, _ = load_config(RewardConfig, argv)
        if config.model is None or config.data is None:
            raise ConfigError("--model and --data are required (or set model/data in the --config file)")
        trainer = RewardTrainer(config)
        trainer.train()
    except (ConfigError, DataError, RewardError, OSError) as err:
        print(f"tether rm: error: {err}", file=sys.stderr)
        return 2
    print(f"reward model saved to {os.path.join(config.output_dir, 'final')}")
    if trainer.report_path is not None:
        print(f"report:               {trainer.report_path}")
    return 0
