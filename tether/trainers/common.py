"""Pieces every RL trainer's loop calls: set-up, the mini-batch update loop, score shaping and metrics.

Orchestration only; the maths lives in ``tether.kl``, ``tether.advantages``, ``tether.losses`` and
``tether.logprobs``. Shapes: B sequences, T response length.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.backend import (
    Backend,
    SingleProcess,
    TorchDistributed,
    autocast,
    enable_gradient_checkpointing,
    make_backend,
    make_grad_scaler,
    rank_slice,
)
from tether.checkpoint import checkpoint_path
from tether.checks import check_run_inputs
from tether.config import ConfigError, RLConfig
from tether.data import PromptData, PromptSampler, check_prompt_lengths, load_prompts, render_prompts
from tether.health import HealthWarning
from tether.kl import KLTerms, kl_k1, kl_needs_logits, kl_needs_loss_term, make_kl_controller, token_kl
from tether.logging.base import KL_TOKENS_TABLE
from tether.logprobs import PolicyForward, response_logits
from tether.losses import aggregate, loss_normalizer
from tether.models import AdapterDisabledReference, context_length, load_causal_lm, load_tokenizer
from tether.numerics import finite_gradients
from tether.ops import masked_mean
from tether.plan import check_memory_at_start
from tether.quality import (
    format_high_kl,
    high_kl_tokens,
    kl_by_token,
    kl_table_rows,
    quality_metrics,
    top_kl_share,
)
from tether.rewards import Reward, RunningNorm, build_reward
from tether.rewards.model import uses_last_token_pooling
from tether.rollout import Generation, build_rollout, concat_rollouts
from tether.run import LoopState, RunOutputs, linear_schedule, report_health
from tether.sampling import biased_sampling_warning, check_sampling_config
from tether.sharding import (
    accelerate_asks_fsdp,
    apply_launcher_settings,
    decoder_layer_names,
    is_sharded,
    shard_model,
)
from tether.stop import RunStopped, StopSignals
from tether.types import Rollout
from tether.zero import ZeroBackend, accelerate_asks_deepspeed


class RLInputs(NamedTuple):
    """What every RL trainer loads before it builds its own models."""

    backend: Backend
    device: torch.device
    policy: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    data: PromptData
    reward: Reward
    score_norm: RunningNorm | None


def load_rl_inputs(
    config: RLConfig,
    algo: str,
    policy: str | Path | PreTrainedModel,
    reward: Any,
    prompts: Any,
    tokenizer: str | Path | PreTrainedTokenizerBase | None,
) -> RLInputs:
    """Check the inputs up front - sampling settings, output directory, device, policy and tokenizer paths,
    then the prompts (chat-rendered) against max_prompt_length and the policy's context - and the memory plan,
    seed, then load the policy and the reward. Every check runs before the first model loads, so a bad input
    costs seconds and gets one message. ``algo``: "ppo" or "grpo" (which models the memory plan counts)."""
    check_sampling_config(config.sampling)
    warning = biased_sampling_warning(config.sampling)
    if warning:
        print(warning, file=sys.stderr)
    check_run_inputs(config.output_dir, config.device, policy, tokenizer)
    sharded = config.sharding != "none" or accelerate_asks_fsdp() or accelerate_asks_deepspeed()
    backend = make_backend(group_for_one=sharded)
    for change in apply_launcher_settings(config, backend.world_size, isinstance(backend, TorchDistributed)):
        if backend.is_main:
            print(f"tether: {change}", file=sys.stderr)
    if config.sharding == "deepspeed":
        backend = ZeroBackend(config)  # the process group is open: this only adds the engine's backward and step
    check_world_size(config, backend.world_size)
    device = backend.device(config.device)
    tok = load_tokenizer(tokenizer, policy)
    data = render_prompts(load_prompts(prompts), tok)
    context = context_length(policy)
    check_prompt_lengths(data, tok, config.max_prompt_length, context, config.sampling.max_new_tokens)
    check_memory_at_start(config, algo, policy, backend.world_size, device, reward=reward)  # before loading
    torch.manual_seed(config.seed)
    model = load_causal_lm(policy)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    built = (
        reward
        if isinstance(reward, Reward)
        else build_reward(
            reward,
            weights=config.reward_weights,
            baseline=config.reward_baseline,
            device=device,
            batch_size=config.reward_batch_size,
        )
    )
    score_norm = RunningNorm(clip=None, shift_mean=True) if config.reward_norm else None
    return RLInputs(backend, device, model, tok, data, built, score_norm)


def check_world_size(config: RLConfig, world_size: int) -> None:
    """Batch sizes are global (the whole job); each process takes an equal share of prompts and mini-batches."""
    for name, value in (
        ("rollout_batch_size", config.rollout_batch_size),
        ("mini_batch_size", config.mini_batch_size),
    ):
        if value % world_size:
            raise ConfigError(
                f"{name} ({value}) must be divisible by the number of processes ({world_size}): batch sizes are "
                "global, and every process takes an equal share (micro_batch_size is per process)"
            )


class StepBatch(NamedTuple):
    """One step's rollout and scores over every process, in rank order (what the loss and the metrics use)."""

    rollout: Rollout
    raw_scores: torch.Tensor  # [B]
    components: dict[str, torch.Tensor]  # name -> [B]
    prompts: list[str]
    responses: list[str]


def gather_step(backend: Backend, batch: StepBatch, pad_token_id: int, device: torch.device) -> StepBatch:
    """Every process's share of a step, stacked in rank order on every process (the identity in one process)."""
    if backend.world_size == 1:
        return batch
    cpu = StepBatch(
        batch.rollout.to("cpu"),
        batch.raw_scores.cpu(),
        {k: v.cpu() for k, v in batch.components.items()},
        batch.prompts,
        batch.responses,
    )
    parts: list[StepBatch] = backend.gather_objects(cpu)
    return StepBatch(
        concat_rollouts([part.rollout for part in parts], pad_token_id).to(device),
        torch.cat([part.raw_scores for part in parts]).to(device),
        {k: torch.cat([part.components[k] for part in parts]) for k in batch.components},
        [p for part in parts for p in part.prompts],
        [r for part in parts for r in part.responses],
    )


def make_optimizer(
    params: Iterable[nn.Parameter], config: RLConfig, total_updates: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable ``params`` and its learning-rate schedule over ``total_updates`` steps."""
    optimizer = torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=config.learning_rate,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(total_updates, config.lr_scheduler)
    )
    return optimizer, scheduler


def shard_models(config: RLConfig, trained: Iterable[nn.Module], frozen: Iterable[nn.Module | None]) -> None:
    """Under ``sharding: fsdp``, shard the trained models (and, when asked, the frozen reference) in place.

    Call it after the models are on their device and before the optimiser is built over their parameters.
    """
    if config.sharding != "fsdp":
        return
    for model in trained:
        shard_model(model)
    if config.shard_frozen_models:
        for model in frozen:
            if model is None or isinstance(model, AdapterDisabledReference):
                continue  # none, or the policy itself with its adapters off
            if decoder_layer_names(model):
                # a decoder reward model is run through its backbone (tether pools the last token itself)
                root = getattr(model, model.base_model_prefix) if uses_last_token_pooling(model) else model
                shard_model(model, root)
            else:
                print(f"tether: {type(model).__name__} names no layer class to shard; kept whole", file=sys.stderr)


def make_loop_state(
    config: RLConfig,
    trained: nn.Module,
    total_updates: int,
    n_prompts: int,
    score_norm: RunningNorm | None,
    device: torch.device,
    backend: Backend | None = None,
) -> LoopState:
    """The training state of a new run: optimiser and schedule over ``trained``'s parameters, KL controller,
    prompt sampler, update shuffling, and the fp16 loss scaler. Under ``sharding: deepspeed`` the ``backend``
    wraps ``trained`` and the optimiser in a DeepSpeed ZeRO engine (:mod:`tether.zero`)."""
    optimizer, scheduler = make_optimizer(trained.parameters(), config, total_updates)
    if config.sharding == "deepspeed" and not isinstance(backend, ZeroBackend):
        raise ValueError("sharding: deepspeed: make_loop_state needs the run's backend (load_rl_inputs made it)")
    engine = backend.prepare(trained, optimizer) if isinstance(backend, ZeroBackend) else None
    return LoopState(
        optimizer=optimizer,
        scheduler=scheduler,
        kl_ctl=make_kl_controller(config.kl.coef, config.kl.target, config.kl.horizon),
        sampler=PromptSampler(n_prompts, config.seed),
        update_generator=torch.Generator().manual_seed(config.seed + 1),
        score_norm=score_norm,
        trained=trained,
        grad_scaler=make_grad_scaler(device, config.mixed_precision, is_sharded(trained)),
        engine=engine,
    )


def shape_scores(scores: torch.Tensor, score_norm: RunningNorm | None, clip: float | None) -> torch.Tensor:
    """Optional running normalisation, then clipping, of the sequence scores [B]."""
    if score_norm is not None:
        score_norm.update(scores)
        if score_norm.count >= 2:
            scores = score_norm.normalize(scores)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def kl_loss_term(
    config: RLConfig, ref_policy: nn.Module | None, batch: Rollout, fwd: PolicyForward, normalizer: float
) -> torch.Tensor | None:
    """The aggregated KL loss term of one micro-batch, before the coefficient; None when there is no reference
    or the configured placement and estimator need no loss term (:func:`tether.kl.kl_needs_loss_term`)."""
    kl_cfg = config.kl
    if ref_policy is None or not kl_needs_loss_term(kl_cfg.placement, kl_cfg.estimator):
        return None
    if batch.ref_logprobs is None:
        raise ValueError("a KL loss term needs the rollout's reference logprobs")
    ref_logits = None
    if kl_needs_logits(kl_cfg.estimator):  # the exact KL needs the reference's whole distribution again
        with torch.no_grad():
            ref_logits = response_logits(
                ref_policy, batch.input_ids, batch.attention_mask, batch.prompt_length
            )
    terms = KLTerms(
        fwd.model_logprobs, batch.ref_logprobs, fwd.logits, ref_logits, config.sampling.temperature
    )
    kl = token_kl(kl_cfg.estimator, terms)
    return aggregate(
        kl, batch.response_mask, config.loss_aggregation, normalizer, config.aggregation_constant
    )


def policy_forward_due(config: RLConfig, step: int, generation: Generation) -> bool:
    """Whether the rollout of step ``step`` (0-based) runs the policy forward over its sampled tokens.

    The sampler's logprobs and entropy stand in for the forward's (the same numbers from the same logits, to
    float rounding) except on the steps ``logprob_check_steps`` sets aside to measure that agreement, and when
    they cannot: the exact KL needs the policy's logits, mixed precision trains in another precision than the
    float32 sampler, and a generator may not keep them.
    """
    if generation.logprobs is None or generation.model_logprobs is None or generation.entropy is None:
        return True
    if config.mixed_precision != "no" or config.kl.log_exact or kl_needs_logits(config.kl.estimator):
        return True
    every = config.logprob_check_steps
    return step == 0 or (every > 0 and step % every == 0)


def rollout_forwards(
    config: RLConfig,
    generation: Generation,
    policy: nn.Module,
    eos_token_ids: list[int],
    device: torch.device,
    *,
    ref_policy: nn.Module | None,
    value_model: nn.Module | None = None,
    policy_forward: bool = True,
) -> Rollout:
    """The no-grad forwards over ``generation`` (:func:`tether.rollout.build_rollout`) with the run's settings,
    under its autocast."""
    with autocast(device, config.mixed_precision):
        return build_rollout(
            generation,
            policy,
            config.sampling,
            eos_token_ids,
            ref_policy=ref_policy,
            value_model=value_model,
            kl_estimator=config.kl.estimator,
            log_exact_kl=config.kl.log_exact,
            chunk_size=config.forward_batch_size or config.micro_batch_size,
            policy_forward=policy_forward,
        )


def micro_batch_of(rollout: Rollout, rows: torch.Tensor, *per_row: torch.Tensor) -> tuple[Rollout, ...]:
    """Rows ``rows`` of ``rollout`` with the all-padding columns trimmed (:meth:`Rollout.trimmed`), and the same
    rows of each per-row tensor ([B] as is, [B, T] cut to the trimmed T)."""
    batch = rollout.index(rows).trimmed()
    T = batch.response_mask.shape[1]
    return (batch, *(x[rows][:, :T] if x.dim() == 2 else x[rows] for x in per_row))


def micro_batches(
    rows: torch.Tensor, lengths: torch.Tensor, max_rows: int, max_tokens: int | None
) -> list[torch.Tensor]:
    """Split ``rows`` into micro-batches of similar length, longest first: rows sorted by ``lengths`` (of all B
    rows), at most ``max_rows`` per micro-batch and, with ``max_tokens``, at most that many padded tokens (rows x
    the longest row's length; a row longer than the budget goes alone). The sort is stable, so equal lengths
    keep their shuffled order."""
    order = torch.sort(lengths[rows], descending=True, stable=True).indices
    rows = rows[order]
    row_lengths = lengths[rows].tolist()
    out: list[torch.Tensor] = []
    start = 0
    while start < len(rows):
        end = min(start + max_rows, len(rows))
        if max_tokens is not None:  # the first row of a micro-batch is its longest
            end = min(end, start + max(1, max_tokens // max(int(row_lengths[start]), 1)))
        out.append(rows[start:end])
        start = end
    return out


MicroBatchLoss = Callable[[torch.Tensor, float], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def run_updates(
    config: RLConfig,
    response_mask: torch.Tensor,
    epochs: int,
    micro_batch_loss: MicroBatchLoss,
    params: Callable[[], Iterable[nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    per_token: frozenset[str],
    backend: Backend | None = None,
    grad_scaler: Any = None,
    lengths: torch.Tensor | None = None,
    problems: list[str] | None = None,
) -> dict[str, float]:
    """``epochs`` passes of shuffled mini-batch optimiser steps, each accumulating micro-batch gradients.

    ``micro_batch_loss(rows, normalizer)`` returns the loss of those rows already divided by the whole
    mini-batch's ``normalizer`` (so the accumulated gradient does not depend on the micro-batch size) and its
    statistics. Statistics named in ``per_token`` are token sums, divided by the tokens seen; the others are
    averaged over mini-batches.

    With several processes every one holds the whole rollout and draws the same shuffles; each takes its share
    of every mini-batch, the gradients are summed over the processes before the step, and so are the statistics.
    With fp16, ``grad_scaler`` scales the loss before backward and unscales the gradients before clipping; it
    skips a step whose gradients overflowed (and lowers its scale).

    Each process's rows are split into micro-batches by :func:`micro_batches`: sorted by ``lengths`` [B] (each
    row's real tokens; default all equal) so a micro-batch pads little once trimmed, ``micro_batch_size`` rows at
    most and, with ``config.micro_batch_tokens``, a token budget. The gradient is the same sum either way.

    A mini-batch whose loss or summed gradient holds NaN / inf skips its optimiser step; what was skipped is
    appended to ``problems`` and counted in ``numerics/skipped_updates`` (with fp16 the grad scaler does this).

    Under ``sharding: deepspeed`` (a :class:`tether.zero.ZeroBackend`) the engine runs each backward (its
    average over processes made the sum), and clips, steps or skips a NaN / inf step in ``zero.step()``.
    """
    backend = backend or SingleProcess()
    zero = backend if isinstance(backend, ZeroBackend) else None
    if lengths is None:
        lengths = torch.ones(response_mask.shape[0], dtype=torch.long, device=response_mask.device)
    if config.micro_batch_tokens is not None and backend.world_size > 1:
        # every process must run the same number of forwards (sharded models gather in each one)
        raise ConfigError("micro_batch_tokens works in one process only for now; use micro_batch_size")
    B = response_mask.shape[0]
    device = response_mask.device
    totals: dict[str, float] = {}
    n_tokens = 0.0
    n_minibatches = skipped = 0
    for epoch in range(epochs):
        order = torch.randperm(B, generator=generator).to(device)
        for start in range(0, B, config.mini_batch_size):
            mb = order[start : start + config.mini_batch_size]
            normalizer = loss_normalizer(
                response_mask[mb], config.loss_aggregation, config.aggregation_constant
            )
            optimizer.zero_grad(set_to_none=True)
            mine = mb[rank_slice(len(mb), backend.rank, backend.world_size, "mini_batch_size")]
            loss_ok = torch.ones((), dtype=torch.bool, device=device)
            chunks = micro_batches(mine, lengths, config.micro_batch_size, config.micro_batch_tokens)
            for i, rows in enumerate(chunks):
                loss, stats = micro_batch_loss(rows, normalizer)
                loss_ok &= torch.isfinite(loss.detach()).to(device)
                if zero is not None:
                    zero.backward(loss, last=i == len(chunks) - 1)
                else:
                    (loss if grad_scaler is None else grad_scaler.scale(loss)).backward()
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
            backend.all_reduce_grads([p for p in params() if p.requires_grad])
            n_minibatches += 1
            n_tokens += float(response_mask[mb].sum())
            if zero is not None:
                finite = zero.step()  # DeepSpeed clips and steps, or skips a step on NaN / inf
            else:
                finite = grad_scaler is not None or finite_gradients(params(), backend, bool(loss_ok))
            if not finite:
                optimizer.zero_grad(set_to_none=True)  # skip this optimiser step: never train on NaN / inf
                scheduler.step()
                skipped += 1
                if problems is not None:
                    where = f"epoch {epoch + 1}, mini-batch {start // config.mini_batch_size + 1}"
                    problems.append(f"NaN/inf {'gradient' if bool(loss_ok) else 'loss'} in {where}")
                continue
            if zero is not None:
                scheduler.step()
                continue
            if grad_scaler is not None:
                grad_scaler.unscale_(optimizer)
            if config.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(list(params()), config.max_grad_norm)
            if grad_scaler is None:
                optimizer.step()
            else:
                grad_scaler.step(optimizer)
                grad_scaler.update()
            scheduler.step()
    if backend.world_size > 1:
        keys = sorted(totals)
        summed = backend.all_reduce_sum(torch.tensor([totals[k] for k in keys], dtype=torch.float64))
        totals = dict(zip(keys, summed.tolist(), strict=True))
    out = {k: v / max(n_tokens, 1.0) if k in per_token else v / n_minibatches for k, v in totals.items()}
    out["numerics/skipped_updates"] = float(skipped)
    return out


def rollout_metrics(
    ro: Rollout,
    scores: torch.Tensor,
    components: dict[str, torch.Tensor],
    kl_coef: float,
    show_components: bool,
) -> dict[str, float]:
    """The metrics every RL trainer logs about a rollout (TRL's names where TRL has one), with the text-quality
    metrics of its responses (``quality/*``) and, with a reference, how concentrated its KL is on a few token
    types (``kl/top5_token_share``): see :mod:`tether.quality`."""
    mask = ro.response_mask
    m: dict[str, float] = {
        "objective/scores": float(scores.mean()),
        "objective/scores_std": float(scores.std()) if scores.numel() > 1 else 0.0,
    }
    if ro.kl is not None and ro.ref_logprobs is not None:
        seq_k1 = kl_k1(ro.model_logprobs, ro.ref_logprobs).masked_fill(~mask, 0.0).sum(-1)
        m["objective/kl"] = float(ro.kl.sum(-1).mean())
        m["kl/negative_fraction"] = float((seq_k1 < 0).float().mean())
        m["kl/k1"] = float(seq_k1.mean())
        m["kl/top5_token_share"] = top_kl_share(kl_by_token(ro.kl, ro.response_ids, mask), 5)
        if ro.exact_kl is not None:
            m["kl/exact"] = float(ro.exact_kl.sum(-1).mean())
    m["objective/entropy"] = float(masked_mean(ro.entropy, mask)) if mask.any() else 0.0
    m["kl/coef"] = kl_coef
    lengths = mask.sum(-1).float()
    m["rollout/response_length"] = float(lengths.mean())
    m["rollout/eos_fraction"] = float(ro.has_eos.float().mean())
    m.update(quality_metrics(ro.response_ids, mask))
    if ro.gen_logprobs is not None:
        # Rollout/trainer agreement: what the generator sampled with vs the training forward (same tokens).
        diff = (ro.gen_logprobs - ro.logprobs).abs().masked_fill(~mask, 0.0)
        m["rollout/logprob_diff_max"] = float(diff.max())
        m["rollout/logprob_diff_mean"] = float(diff.sum() / mask.sum().clamp(min=1))
    if show_components:
        for name, values in components.items():
            m[f"rewards/{name}/mean"] = float(values.mean())
            m[f"rewards/{name}/std"] = float(values.std()) if values.numel() > 1 else 0.0
    return m


def sample_rows(
    prompts: list[str],
    responses: list[str],
    scores: torch.Tensor,
    seq_kl: torch.Tensor | None,
    n: int,
    high_kl: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The first ``n`` rows of a step as a sample table: prompt, response, score and summed KL, and with
    ``high_kl`` (one string per row, :func:`tether.quality.format_high_kl`) the response's highest-KL tokens."""
    n = min(n, len(prompts))
    rows: list[dict[str, Any]] = [
        {
            "prompt": prompts[i],
            "response": responses[i],
            "score": float(scores[i]),
            "kl": float(seq_kl[i]) if seq_kl is not None else 0.0,
        }
        for i in range(n)
    ]
    if high_kl is not None:
        for row, marked in zip(rows, high_kl, strict=False):  # high_kl may cover more rows than are shown
            row["high_kl_tokens"] = marked
    return rows


def update_inputs(ro: Rollout) -> dict[str, torch.Tensor | None]:
    """The per-token rollout tensors every update reads, by name, for :func:`tether.numerics.nonfinite_inputs`."""
    return {"old logprobs": ro.logprobs, "reference logprobs": ro.ref_logprobs, "kl": ro.kl}


def stop_if_asked(
    stop: StopSignals,
    backend: Backend,
    config: RLConfig,
    step: int,
    run_dir: Path,
    checkpoint: Callable[[], Path | None],
    command: str,
) -> None:
    """At the end of step ``step``: when a process was asked to stop (SIGINT / SIGTERM), write this step's
    checkpoint (unless :func:`record_step` just did) on every process and raise :class:`RunStopped`."""
    signum = stop.agreed(backend)
    if signum is None:
        return
    saved = config.logging.save_steps > 0 and step % config.logging.save_steps == 0
    if not saved:
        checkpoint()
    raise RunStopped(signum, step, checkpoint_path(run_dir, step), run_dir, command)


class SampleBatch(NamedTuple):
    """A step's [B] prompts, responses, scores and summed KLs (None without a reference), for sample tables.

    With ``rollout`` (the step's gathered rollout) and ``tokenizer``, the step also logs its KL attribution
    table (``kl_tokens``) and the sample table marks each response's highest-KL tokens.
    """

    prompts: list[str]
    responses: list[str]
    scores: torch.Tensor
    seq_kl: torch.Tensor | None
    rollout: Rollout | None = None
    tokenizer: PreTrainedTokenizerBase | None = None


#: Tokens marked per response in a sample table's ``high_kl_tokens`` column.
HIGH_KL_TOKENS_PER_ROW = 3


def token_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[int], str]:
    """One token id -> its text (special tokens kept, so an EOS that carries KL shows as itself)."""
    return lambda token: tokenizer.decode([token])


def kl_token_table(samples: SampleBatch) -> list[dict[str, Any]] | None:
    """The step's KL attribution table (:func:`tether.quality.kl_table_rows`), None without a per-token KL or a
    tokenizer to decode with."""
    ro = samples.rollout
    if ro is None or ro.kl is None or samples.tokenizer is None:
        return None
    attribution = kl_by_token(ro.kl, ro.response_ids, ro.response_mask)
    return kl_table_rows(attribution, token_decoder(samples.tokenizer))


def step_samples(samples: SampleBatch, n: int) -> list[dict[str, Any]]:
    """The sample table of a step: its first ``n`` rows, each with its highest-KL tokens when they are known."""
    ro = samples.rollout
    high_kl = None
    if ro is not None and ro.kl is not None and samples.tokenizer is not None:
        k = min(n, len(samples.prompts))
        marked = high_kl_tokens(ro.kl[:k], ro.response_ids[:k], ro.response_mask[:k], HIGH_KL_TOKENS_PER_ROW)
        decode = token_decoder(samples.tokenizer)
        high_kl = [format_high_kl(tokens, decode) for tokens in marked]
    return sample_rows(samples.prompts, samples.responses, samples.scores, samples.seq_kl, n, high_kl)


class StepTimes(NamedTuple):
    """``time.perf_counter()`` at the start of a step, after sampling, after advantages and after the update."""

    start: float
    generated: float
    prepared: float
    updated: float


def record_step(
    config: RLConfig,
    out: RunOutputs,
    state: LoopState,
    metrics: dict[str, float],
    times: StepTimes,
    n_generated_tokens: float,
    samples: SampleBatch,
    checkpoint: Callable[[], Any],
    progress_keys: tuple[str, ...],
) -> tuple[dict[str, float], list[HealthWarning]]:
    """The end of a step, the same for every RL trainer: add the learning rate and timings to ``metrics``, log
    them, check health, write the sample table when due and the KL attribution table (``kl_tokens.jsonl``,
    when ``samples`` carries the rollout and tokenizer), the checkpoint when due, move the progress bar.

    Returns the history row and the health warnings that fired.
    """
    metrics.update(
        {
            "lr": state.scheduler.get_last_lr()[0],
            "time/generate_s": times.generated - times.start,
            "time/rollout_s": times.prepared - times.start,
            "time/update_s": times.updated - times.prepared,
            "perf/episodes_per_s": config.rollout_batch_size / (times.updated - times.start),
            "perf/gen_tokens_per_s": n_generated_tokens / max(times.generated - times.start, 1e-9),
        }
    )
    record = {"episode": state.episode, **metrics}
    out.logger.log_metrics(record, state.step)
    warnings = report_health(out, metrics, state.step)
    log = config.logging
    if log.sample_steps > 0 and (state.step % log.sample_steps == 0 or state.step == 1):
        out.logger.log_samples(step_samples(samples, log.num_sample_rows), state.step)
    kl_table = kl_token_table(samples)
    if kl_table is not None:
        out.logger.log_table(KL_TOKENS_TABLE, kl_table, state.step)
    out.progress.update(config.rollout_batch_size, {k: metrics[k] for k in progress_keys if k in metrics})
    if log.save_steps > 0 and state.step % log.save_steps == 0:
        checkpoint()
    return {"step": state.step, **record}, warnings
