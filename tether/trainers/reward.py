"""Reward-model training on pairwise preferences (Bradley–Terry), the loop behind ``tether rm``.

One loop, top to bottom: batch of pairs -> micro-batches (chosen and rejected in one forward) -> Bradley–Terry
loss scaled by the micro-batch's share of the batch -> clip, step -> log / evaluate / checkpoint. The score is
read at the last valid token by :func:`tether.rewards.model.sequence_scores`, the same function that scores
rollouts, so training and use cannot disagree on where a text's reward lives.

The run directory is the RL trainers' (:mod:`tether.run`): a fresh run refuses a directory holding another,
``metrics.jsonl`` gets every optimiser step, ``checkpoints/step-N`` holds the model (``policy/``, loadable with
``from_pretrained``) and the trainer state, and ``RewardTrainer.resume`` / ``tether rm --resume RUN_DIR``
continue from the newest checkpoint exactly as if the run had not stopped.

Batch vocabulary (TRL names in brackets): ``batch_size`` pairs per optimiser step over every process
[per_device_train_batch_size * gradient_accumulation_steps * num_processes], ``micro_batch_size`` pairs per
forward/backward in one process [per_device_train_batch_size]; ``gradient_accumulation_steps`` is derived.

Under ``torchrun`` / ``accelerate launch`` (:mod:`tether.backend`) every process draws the same shuffled order,
takes its share of each batch and divides its loss by the *whole* batch's pair count, so the gradients summed
over the processes are the one-process gradient; the statistics (and the evaluation, each process scoring its
share of the held-out pairs) are sums reduced over the processes. The number of processes changes nothing but
speed (with dropout off, the default); only rank 0 writes the run directory, and a checkpoint holds no
per-process state, so a run resumes under any number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tether.backend import Backend, SingleProcess, make_backend, on_main
from tether.checkpoint import checkpoint_path, load_policy_weights, save_checkpoint, set_rng_state
from tether.checks import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Range, check_ranges
from tether.config import ConfigError, to_dict
from tether.data import DataError
from tether.logging import ConsoleLogger, MultiLogger, build_loggers
from tether.models import disable_dropout
from tether.numerics import NonFiniteGuard, finite_gradients
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
from tether.run import (
    claim_run_dir,
    enter_run_dir,
    finish_run,
    input_specs,
    linear_schedule,
    open_checkpoint,
    release_run_lock,
    run_dir_of,
    write_report,
    write_run_files,
)
from tether.stop import RunStopped, StopSignals
from tether.zero import accelerate_asks_deepspeed

#: Allowed values of RewardConfig's fields (every float field must also be finite).
REWARD_RANGES: dict[str, Range] = {
    "learning_rate": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": Range(
        0, low_open=True, hint="; use null (--max_grad_norm none) to disable gradient clipping"
    ),
    "num_epochs": AT_LEAST_ONE,
    "max_nonfinite_steps": NON_NEGATIVE,
    "batch_size": AT_LEAST_ONE,
    "micro_batch_size": AT_LEAST_ONE,
    "max_length": AT_LEAST_ONE,
    "eval_fraction": Range(0, 1, high_open=True, hint=" (0 disables evaluation)"),
    "logging_steps": AT_LEAST_ONE,
    "eval_steps": Range(0, hint=" (0 evaluates at the end of every epoch)"),
    "save_steps": Range(0, hint=" (0 disables intermediate checkpoints)"),
    "save_total_limit": AT_LEAST_ONE,
}


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
    """Run directory: config.yaml, inputs.yaml, metrics.jsonl, checkpoints/step-N, final/, report.html."""
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that already holds a run (its logs, checkpoints and final/ are removed).
    Without it, such a directory is an error unless the run is resumed, so no earlier run is mixed or lost."""
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
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; None disables clipping."""
    num_epochs: int = 1
    """Passes over the training pairs."""
    max_nonfinite_steps: int = 3
    """An optimiser step whose loss or gradient holds NaN / inf is skipped with a warning; this many in a row stop
    the run with advice (0: never stop)."""
    batch_size: int = 16
    """Pairs per optimiser step over every process (TRL: per_device_train_batch_size *
    gradient_accumulation_steps * num_processes); each of N processes takes batch_size / N of them."""
    micro_batch_size: int = 8
    """Pairs per forward/backward in one process (TRL: per_device_train_batch_size); must divide
    batch_size / N."""
    max_length: int | None = None
    """Token limit per text; longer texts are cut from the left. None: the model's context, longer is an error."""
    eval_fraction: float = 0.1
    """Share of data held out for evaluation when eval_data is not given (0 disables evaluation)."""
    use_margin: bool = False
    """Read a 'margin' column and train on -logsigmoid(r_chosen - r_rejected - margin) (Llama 2)."""
    disable_dropout: bool = True
    """Dropout off during training, as TRL's RewardTrainer does: a reward model is read with dropout off."""
    logging_steps: int = 10
    """Print the compact console line every N steps (metrics.jsonl gets every step); evaluations are printed
    when they run, as the RL trainers' sample tables are."""
    eval_steps: int = 0
    """Evaluate every N optimiser steps; 0 evaluates at the end of every epoch."""
    save_steps: int = 0
    """Write a checkpoint every N steps (0 disables intermediate checkpoints); --resume continues from one."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints (the newest)."""
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "console"])
    """Logging backends: jsonl (always on), console, tensorboard, wandb, none."""
    report: bool = True
    """Write output_dir/report.html (loss, accuracy and margin curves; config) at the end of training."""
    normalize_data: str | None = None
    """File of reference-policy samples (prompt, response): after training, set the reward's gain/bias so
    these score mean 0 / std 1 (OpenAI lm-human-preferences); stored in the saved model's config."""

    def __post_init__(self) -> None:
        check_ranges(self, REWARD_RANGES)
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimiser step in one process (each of N processes runs this / N)."""
        return self.batch_size // self.micro_batch_size


def check_world_size(config: RewardConfig, world_size: int) -> None:
    """batch_size is global: each of ``world_size`` processes takes an equal share, in whole micro-batches."""
    if config.batch_size % world_size:
        raise ConfigError(
            f"batch_size ({config.batch_size}) must be divisible by the number of processes ({world_size}): it "
            "counts the pairs of an optimiser step over every process (micro_batch_size is per process)"
        )
    share = config.batch_size // world_size
    if share % config.micro_batch_size:
        raise ConfigError(
            f"each of the {world_size} processes takes {share} of the batch_size of {config.batch_size} pairs, "
            f"which must be a multiple of micro_batch_size ({config.micro_batch_size})"
        )


def pair_share(n: int, rank: int, world_size: int) -> slice:
    """The contiguous share of ``n`` pairs that ``rank`` handles: :func:`tether.backend.rank_slice`'s when
    ``n`` divides by ``world_size`` (every full batch); otherwise (an epoch's short last batch, the held-out
    pairs) the first ``n % world_size`` processes take one pair more, and a share may be empty."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


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
    model: PreTrainedModel,
    pairs: EncodedPairs,
    micro_batch_size: int,
    pad_id: int,
    backend: Backend | None = None,
) -> dict[str, float]:
    """``eval/loss``, ``eval/accuracy`` and ``eval/margin_mean`` (mean r_chosen - r_rejected) over all pairs.

    With several processes each scores its share of the pairs; the sums are reduced over the processes, so every
    process returns the one-process values.
    """
    backend = backend or SingleProcess()
    device = next(model.parameters()).device
    n = len(pairs.chosen)
    mine = range(n)[pair_share(n, backend.rank, backend.world_size)]
    was_training = model.training
    model.eval()
    chosen, rejected, margins = [], [], []
    with torch.inference_mode():
        for start in range(0, len(mine), micro_batch_size):
            out = score_pairs(model, pairs, mine[start : start + micro_batch_size], pad_id)
            chosen.append(out.chosen)
            rejected.append(out.rejected)
            if out.margins is not None:
                margins.append(out.margins)
    model.train(was_training)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, margin summed over my pairs
    if mine:
        c, r = torch.cat(chosen), torch.cat(rejected)
        result = bradley_terry_loss(c, r, torch.cat(margins) if margins else None)
        # means times counts: in one process, x * n / n gives back the float32 mean exactly
        means = [result.loss.item(), result.accuracy.item(), (c - r).mean().item()]
        sums = torch.tensor(means, dtype=torch.float64, device=device) * len(mine)
    loss, correct, margin = (backend.all_reduce_sum(sums) / n).tolist()
    return {"eval/loss": loss, "eval/accuracy": correct, "eval/margin_mean": margin}


class StepStats(NamedTuple):
    """Bradley–Terry loss and accuracy of the pairs of one optimiser step, summed over them and divided by the
    step's pair count (the mean in one process; one process's part of the mean with several)."""

    loss: float
    accuracy: float


def accumulate_gradients(
    model: PreTrainedModel,
    pairs: EncodedPairs,
    rows: Sequence[int],
    micro_batch_size: int,
    pad_id: int,
    total: int | None = None,
) -> StepStats:
    """Backpropagate the Bradley–Terry loss of ``rows``, summed and divided by ``total`` pairs (default: the
    mean over ``rows``), in micro-batches of ``micro_batch_size`` pairs.

    Each micro-batch's mean loss is weighted by its share of ``total``, so ``.grad`` holds the same gradient
    whatever the micro-batch size, also when the last micro-batch is shorter. A process given its share of a
    batch and the whole batch's size as ``total`` gets its part of the batch gradient and statistics: summed
    over the processes, they are the one-process values.
    """
    total = len(rows) if total is None else total
    loss_sum = correct_sum = 0.0
    for start in range(0, len(rows), micro_batch_size):
        micro = rows[start : start + micro_batch_size]
        out = score_pairs(model, pairs, micro, pad_id)
        result = bradley_terry_loss(out.chosen, out.rejected, out.margins)
        (result.loss * (len(micro) / total)).backward()
        loss_sum += result.loss.item() * len(micro)
        correct_sum += result.accuracy.item() * len(micro)
    return StepStats(loss=loss_sum / total, accuracy=correct_sum / total)


def zero_gradients(model: PreTrainedModel, pairs: EncodedPairs, row: int, pad_id: int) -> StepStats:
    """Zero gradients in the buffers a backward pass fills, from one pair scored with weight 0.

    A process whose share of an epoch's short last batch is empty still joins the gradient all-reduce, which
    needs the same gradient buffers on every process; it adds nothing to the sum or to the statistics.
    """
    out = score_pairs(model, pairs, [row], pad_id)
    (bradley_terry_loss(out.chosen, out.rejected, out.margins).loss * 0.0).backward()
    return StepStats(loss=0.0, accuracy=0.0)


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip the gradients' total L2 norm to ``max_norm`` (None: no clipping); returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if max_norm is None:
        return torch.nn.utils.get_total_norm([p.grad for p in params]).item()
    return torch.nn.utils.clip_grad_norm_(params, max_norm).item()


@dataclass
class RewardLoopState:
    """What ``tether rm`` checkpoints besides the model weights (and the RNG states), restored exactly on resume.

    ``order`` is the current epoch's shuffled rows ([] until the epoch draws it from ``generator``) and
    ``position`` how many of them have been trained on: a run resumed mid-epoch finishes that epoch's order,
    then draws the next epoch's from the generator's saved state, as the uninterrupted run does.
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    step: int = 0
    epoch: int = 0
    order: list[int] = field(default_factory=list)
    position: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "epoch": self.epoch,
            "order": list(self.order),
            "position": self.position,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.step, self.epoch, self.position = int(state["step"]), int(state["epoch"]), int(state["position"])
        self.order = [int(i) for i in state["order"]]


class RewardTrainer:
    """Train a one-output reward model on preference pairs (see the module docstring).

    ``model`` and ``train_data``/``eval_data`` default to ``config.model``/``config.data``/``config.eval_data``;
    ``tokenizer`` defaults to the one saved with a model path (required with a model instance). Call
    :meth:`resume` before :meth:`train` to continue a run from its newest checkpoint.
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
        if accelerate_asks_deepspeed():
            raise ConfigError(
                "tether rm does not run under DeepSpeed yet: launch it with a DDP accelerate config or torchrun "
                "(its processes hold whole models and sum gradients) - see docs/distributed.md"
            )
        self.backend = make_backend()
        check_world_size(cfg, self.backend.world_size)
        self.run_dir = Path(cfg.output_dir)
        self.report_path: Path | None = None  # run_dir/report.html once train() has written it
        torch.manual_seed(cfg.seed)  # a causal LM gets a new, seeded score head, the same in every process
        source = model if model is not None else cfg.model
        if source is None:
            raise ConfigError("no model: pass model=... or set config.model")
        self.device = self.backend.device(cfg.device)
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
        # Inputs given as paths go to inputs.yaml (made absolute), so that `tether rm --resume DIR` finds them.
        self.inputs = input_specs(
            model=source, data=train_source, eval_data=eval_source, normalize_data=cfg.normalize_data
        )
        self.steps_per_epoch = math.ceil(len(self.train_pairs.chosen) / cfg.batch_size)
        self.total_steps = cfg.num_epochs * self.steps_per_epoch
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, linear_schedule(self.total_steps, cfg.lr_scheduler)
        )
        self.state = RewardLoopState(optimizer, scheduler, torch.Generator().manual_seed(cfg.seed))
        self._resumed_from: Path | None = None

    def _as_preferences(self, source: Any) -> PreferenceData:
        if isinstance(source, PreferenceData):
            if self.config.use_margin and source.margins is None:
                raise DataError(f"{source.source}: use_margin is set but the data has no margins")
            return source
        return load_preferences(source, use_margin=self.config.use_margin)

    @property
    def step(self) -> int:
        """Optimiser steps taken (restored by :meth:`resume`)."""
        return self.state.step

    def resume(self, run_dir: str | Path | None = None) -> Path:
        """Restore the model, optimiser, scheduler, shuffling and RNG states from the newest checkpoint of
        ``run_dir`` (default: the config's output_dir); returns the checkpoint's path.

        The main process locks ``run_dir`` (a live run is refused); an incomplete or corrupt newest checkpoint is
        skipped with a warning; data that no longer fits the checkpoint is refused before anything is loaded.
        """
        ckpt, saved = open_checkpoint(Path(run_dir) if run_dir is not None else self.run_dir)
        if saved["order"] and len(saved["order"]) != len(self.train_pairs.chosen):
            raise ConfigError(
                f"cannot resume from {ckpt}: it was trained on {len(saved['order'])} pairs per epoch, this "
                f"run has {len(self.train_pairs.chosen)} (different data, eval_fraction or seed)"
            )
        load_policy_weights(self.model, ckpt)
        self.state.load_state_dict(saved)
        set_rng_state(saved["rng"])  # last: loading the weights above draws from the global RNG
        self._resumed_from = ckpt
        return ckpt

    def _checkpoint(self) -> Path:
        cfg, state = self.config, self.state
        return save_checkpoint(
            self.run_dir, state.step, self.model, self.tokenizer, state.state_dict(), cfg.save_total_limit
        )

    def _open_run_dir(self) -> list[Path]:
        """The main process's part of opening the run directory: claim it (a fresh run) or check that it
        belongs to the resumed run, lock it, write ``config.yaml`` and ``inputs.yaml``; returns the directories
        whose locks the run holds."""
        source = None if self._resumed_from is None else run_dir_of(self._resumed_from)
        if source is None:
            claim_run_dir(self.run_dir, self.config.overwrite_output_dir)
        locked = enter_run_dir(self.run_dir, source)
        write_run_files(self.run_dir, self.config, self.inputs)
        return locked

    def _gradients(self, batch: Sequence[int]) -> StepStats:
        """The gradient and statistics of one optimiser step's ``batch`` of pairs, summed over the processes.

        This process backpropagates its share, the loss divided by the whole batch's pair count; the sums over
        the processes are then the one-process gradient and mean statistics.
        """
        cfg, backend = self.config, self.backend
        mine = batch[pair_share(len(batch), backend.rank, backend.world_size)]
        if mine:
            stats = accumulate_gradients(
                self.model, self.train_pairs, mine, cfg.micro_batch_size, self.pad_id, total=len(batch)
            )
        else:
            stats = zero_gradients(self.model, self.train_pairs, batch[0], self.pad_id)
        backend.all_reduce_grads([p for p in self.model.parameters() if p.requires_grad])
        summed = backend.all_reduce_sum(torch.tensor(stats, dtype=torch.float64, device=self.device))
        return StepStats(*summed.tolist())

    def train(self) -> list[dict[str, float]]:
        """Run the training loop; returns the metrics records it logged (each with a ``"step"`` key).

        A resumed run returns the records from the checkpoint on; ``metrics.jsonl`` holds the whole run. Every
        process returns the same records; only the main process writes them.
        """
        cfg, model, state, backend = self.config, self.model, self.state, self.backend
        resumed = self._resumed_from is not None
        locked = on_main(backend, self._open_run_dir) or []
        try:
            loggers = _loggers(cfg, self.run_dir, state.step if resumed else None, backend.is_main)
        except BaseException:
            for run_dir in locked:
                release_run_lock(run_dir)
            raise
        optimizer, scheduler = state.optimizer, state.scheduler
        n_train = len(self.train_pairs.chosen)
        history: list[dict[str, float]] = []
        model.train()
        guard = NonFiniteGuard(cfg.max_nonfinite_steps, backend.is_main)
        stop = StopSignals().install()
        try:
            while state.epoch < cfg.num_epochs:
                if not state.order:  # a new epoch (a run resumed mid-epoch goes on with the order it saved)
                    state.order = torch.randperm(n_train, generator=state.generator).tolist()
                while state.position < n_train:
                    # 1. the pairs of this optimiser step (the same on every process)
                    batch = state.order[state.position : state.position + cfg.batch_size]
                    # 2. forward/backward of this process's share in micro-batches, summed over the processes
                    stats = self._gradients(batch)
                    # 3. clip, update; never on a NaN / inf loss or gradient (skipped, counted by the guard)
                    problems = []
                    if finite_gradients(model.parameters(), backend, math.isfinite(stats.loss)):
                        grad_norm = clip_gradients(model.parameters(), cfg.max_grad_norm)
                        learning_rate = optimizer.param_groups[0]["lr"]  # the rate this step used
                        optimizer.step()
                    else:
                        grad_norm, learning_rate = math.nan, optimizer.param_groups[0]["lr"]
                        problems.append("NaN/inf loss or gradient: optimiser step skipped")
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    state.step += 1
                    state.position += len(batch)
                    # 4. log every step (the console prints every logging_steps) / evaluate / checkpoint
                    metrics: dict[str, float] = {
                        "train/loss": stats.loss,
                        "train/accuracy": stats.accuracy,
                        "train/grad_norm": grad_norm,
                        "train/learning_rate": learning_rate,
                        "train/epoch": state.step / self.steps_per_epoch,
                    }
                    eval_due = (
                        state.step % cfg.eval_steps == 0 if cfg.eval_steps else state.position >= n_train
                    )
                    if self.eval_pairs is not None and (eval_due or state.step == self.total_steps):
                        metrics.update(
                            evaluate(model, self.eval_pairs, cfg.micro_batch_size, self.pad_id, backend)
                        )
                    loggers.log_metrics(metrics, state.step)
                    history.append({"step": state.step, **metrics})
                    guard.after_step(state.step, problems)
                    saved = bool(cfg.save_steps) and state.step % cfg.save_steps == 0
                    if saved:
                        on_main(backend, self._checkpoint)
                    signum = stop.agreed(backend)
                    if signum is not None:  # SIGINT / SIGTERM: this step's checkpoint, then stop
                        if not saved:
                            on_main(backend, self._checkpoint)
                        ckpt = checkpoint_path(self.run_dir, state.step)
                        raise RunStopped(signum, state.step, ckpt, self.run_dir, "rm")
                state.epoch, state.order, state.position = state.epoch + 1, [], 0
            # 5. normalise on reference-policy samples (optional; every process, so all hold the same model),
            #    then save final/
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
                loggers.log_metrics({"normalize/gain": gain, "normalize/bias": bias}, state.step)
                history.append({"step": state.step, "normalize/gain": gain, "normalize/bias": bias})
            on_main(backend, finish_run, model, self.tokenizer, self.run_dir)
        finally:
            stop.uninstall()
            loggers.close()
            for run_dir in locked:
                release_run_lock(run_dir)
        # after close(): the report reads metrics.jsonl
        self.report_path = on_main(backend, write_report, self.run_dir, cfg.report)
        return history


#: The console line of ``tether rm`` (the default console keys are the RL ones).
CONSOLE_KEYS = {
    "train/loss": "loss",
    "train/accuracy": "acc",
    "eval/loss": "eval_loss",
    "eval/accuracy": "eval_acc",
    "eval/margin_mean": "eval_margin",
}


class RewardConsole:
    """The console of ``tether rm``: the compact line every ``every`` steps (``logging_steps``, as in the RL
    trainers) and at every evaluation, whose held-out numbers are what a reward-model run is read by (as the
    RL trainers print their sample tables whenever they are written). Implements ``Logger``."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.line = ConsoleLogger(keys=CONSOLE_KEYS)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if step % self.every == 0 or any(key.startswith("eval/") for key in metrics):
            self.line.log_metrics(metrics, step)

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        self.line.log_samples(rows, step)

    def close(self) -> None:
        self.line.close()


def _loggers(cfg: RewardConfig, run_dir: Path, start_step: int | None, is_main: bool) -> MultiLogger:
    """The run's loggers (no-ops in a process other than the main one); ``start_step`` (a resumed run's step)
    drops records logged after its checkpoint."""
    backends = [name for name in cfg.report_to if name != "console"]
    loggers = build_loggers(backends, run_dir, to_dict(cfg), is_main_process=is_main, start_step=start_step)
    if "console" in cfg.report_to and is_main:
        return MultiLogger([*loggers.loggers, RewardConsole(cfg.logging_steps)])
    return loggers


def _select(pairs: EncodedPairs, rows: Sequence[int]) -> EncodedPairs:
    return EncodedPairs(
        chosen=[pairs.chosen[i] for i in rows],
        rejected=[pairs.rejected[i] for i in rows],
        margins=None if pairs.margins is None else [pairs.margins[i] for i in rows],
    )
