"""The group-baseline family: GRPO, Dr. GRPO, DAPO's clip-higher, GSPO, RLOO and REINFORCE++, in one loop.

No value model: the baseline of a completion is the other completions of its prompt (or the batch). One
training step, top to bottom (``GRPOTrainer.train``):

1. rollout     sample G completions for each of ``rollout_batch_size`` prompts (``tether.rollout``), then one
               no-grad forward of the policy (old logprobs) and, when the KL coefficient is > 0, of the
               reference.
2. score       every reward function (or model) on every completion, with the dataset's columns by name.
3. rewards     the score on the last valid token, plus ``-kl_coef * KL`` per token when ``kl.placement`` is
               "reward"; with "loss" (the default) the KL is a loss term in step 5 instead.
4. advantages  the ``advantage`` estimator of ``tether.advantages`` (grpo with ``scale_rewards``, rloo,
               reinforce++), spread over the completion's tokens.
5. update      ``num_iterations`` passes over the batch in mini-batches (micro-batch gradient accumulation):
               the ``policy_loss`` of ``tether.losses`` against the stored old logprobs, aggregated by
               ``loss_aggregation``, plus the KL loss term.
6. KL coef     the adaptive controller when ``kl.target`` is set.
7. log         metrics (PPO's names where they mean the same), sample tables, checkpoints.

The variants are settings, not trainers: Dr. GRPO is ``scale_rewards: none`` with ``loss_aggregation:
token-sum-norm``; DAPO's clip-higher is ``cliprange_high``; GSPO is ``policy_loss: gspo``; RLOO is
``advantage: rloo``; REINFORCE++ is ``advantage: reinforce++`` with ``kl.placement: reward``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.advantages import GROUP_ESTIMATORS, AdvantageInputs, AdvantageSettings, compute_advantages
from tether.backend import autocast, on_main, rank_slice
from tether.config import ConfigError, KLConfig, RLConfig
from tether.health import HealthWarning
from tether.kl import kl_shaped_rewards
from tether.logprobs import policy_logprobs
from tether.losses import PolicyLossSettings, aggregate, approx_kl, policy_loss
from tether.models import disable_dropout, frozen_copy
from tether.numerics import NonFiniteGuard, nonfinite_inputs
from tether.rollout import Generation, HFGenerator
from tether.run import (
    claim_run_dir,
    input_specs,
    load_run_checkpoint,
    open_run,
    save_final,
    save_run_checkpoint,
    write_report,
)
from tether.sampling import missing_eos_penalty
from tether.stop import StopSignals
from tether.trainers.common import (
    SampleBatch,
    StepBatch,
    StepTimes,
    gather_step,
    kl_loss_term,
    load_rl_inputs,
    make_loop_state,
    micro_batch_of,
    policy_forward_due,
    record_step,
    rollout_forwards,
    rollout_metrics,
    run_updates,
    shape_scores,
    shard_models,
    stop_if_asked,
    update_inputs,
)
from tether.types import Rollout


@dataclass
class GRPOConfig(RLConfig):
    """Configuration of a group-baseline run (GRPO and its family). Defaults follow TRL's GRPOConfig."""

    output_dir: str = "runs/grpo"
    """Run directory: config.yaml, metrics.jsonl, samples.jsonl, checkpoints/, final/."""
    learning_rate: float = 1e-6
    """AdamW learning rate of the policy."""
    rollout_batch_size: int = 16
    """Prompts sampled per training step; the step has rollout_batch_size x num_generations sequences."""
    num_generations: int = 4
    """G: completions sampled per prompt; the group baseline is computed over them [TRL: num_generations]."""
    num_iterations: int = 1
    """Optimisation passes over each generation batch, against the stored old logprobs [TRL: num_iterations]."""
    advantage: Literal["grpo", "rloo", "reinforce++"] = "grpo"
    """Advantage estimator (tether.advantages.ADVANTAGE_ESTIMATORS): grpo (group mean and std), rloo
    (leave-one-out mean of the group), reinforce++ (discounted reward-to-go whitened over the batch)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """grpo: divide by the group's std, the batch's std, or nothing (Dr. GRPO)."""
    policy_loss: Literal["ppo-clip", "dual-clip", "gspo"] = "ppo-clip"
    """Policy objective (tether.losses.POLICY_LOSSES): the clipped surrogate, dual-clip (caps the loss of
    negative-advantage tokens at dual_clip x |A|), or GSPO's sequence-level ratio (use small clip ranges)."""
    dual_clip: float = 3.0
    """The bound c > 1 of policy_loss dual-clip."""
    gamma: float = 1.0
    """Discount of the reward-to-go (advantage reinforce++)."""
    kl: KLConfig = field(default_factory=lambda: KLConfig(coef=0.04, estimator="k3", placement="loss"))

    @property
    def sequences_per_step(self) -> int:
        return self.rollout_batch_size * self.num_generations

    @property
    def _sequences_name(self) -> str:
        return "rollout_batch_size x num_generations"

    def __post_init__(self) -> None:
        if self.num_generations < 1:
            raise ConfigError(f"num_generations must be >= 1, got {self.num_generations}")
        if self.advantage in GROUP_ESTIMATORS and self.num_generations < 2:
            raise ConfigError(
                f"advantage {self.advantage!r} needs num_generations >= 2: its baseline is the other completions "
                f"of the same prompt (got {self.num_generations})"
            )
        if self.num_iterations < 1:
            raise ConfigError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.policy_loss == "dual-clip" and self.dual_clip <= 1.0:
            raise ConfigError(f"dual_clip must be > 1, got {self.dual_clip}")
        if self.advantage == "reinforce++" and self.sequences_per_step < 2:
            raise ConfigError(
                "advantage reinforce++ whitens over the batch: it needs at least two sequences per step"
            )
        super().__post_init__()


#: What the progress bar shows.
GROUP_PROGRESS_KEYS = ("objective/scores", "objective/kl", "rollout/frac_reward_zero_std")
#: Statistics of ``micro_batch_loss`` that are sums over tokens (divided by the tokens seen).
PER_TOKEN_STATS = frozenset(
    {"policy/approx_kl", "policy/clipfrac", "policy/clipfrac_low", "policy/clipfrac_high"}
)


class GRPOTrainer:
    """Group-baseline trainer (GRPO and its family). See the module docstring for the loop.

    Args:
        config: a :class:`GRPOConfig`.
        policy: a causal LM (``AutoModelForCausalLM`` directory or instance, or a peft model; with LoRA the
            reference is the same network with the adapters switched off).
        reward: a reward function ``(prompts, completions, **columns) -> list[float]``, ``"file.py:fn"``, a
            built-in (``"exact_match"``, ...), a reward-model directory, or a list of them (``reward_weights``).
        prompts: a list of strings or of chat-message lists, a ``datasets.Dataset`` or a JSONL/CSV/Parquet
            file with a ``prompt`` column; other columns (an ``answer``, ...) reach reward functions by name.
        tokenizer: the policy's tokenizer (loaded from the policy's directory when omitted).
        ref_policy: the frozen reference; a frozen copy of the policy when omitted. None is loaded at all
            when ``kl.coef`` is 0.
    """

    def __init__(
        self,
        config: GRPOConfig,
        policy: str | Path | PreTrainedModel,
        reward: Any,
        prompts: Any,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        ref_policy: PreTrainedModel | None = None,
    ) -> None:
        self.config = config
        inputs = load_rl_inputs(config, "grpo", policy, reward, prompts, tokenizer)
        self.backend, self.device = inputs.backend, inputs.device
        self.policy, self.tokenizer = inputs.policy, inputs.tokenizer
        self.data, self.reward, self.score_norm = inputs.data, inputs.reward, inputs.score_norm
        self.generator = HFGenerator(
            self.policy, self.tokenizer, config.sampling, add_special_tokens=not self.data.chat
        )
        self.eos_token_ids = self.generator.eos_token_ids
        # kl.coef 0 (and no adaptive target to raise it) tethers nothing: no reference model is loaded at all.
        self.ref_policy: torch.nn.Module | None = None
        if config.kl.coef > 0 or config.kl.target is not None:
            self.ref_policy = ref_policy if ref_policy is not None else frozen_copy(self.policy)
        for model in (self.policy, self.ref_policy):
            if model is not None:
                disable_dropout(model)
                model.to(self.device)
        if self.ref_policy is not None:
            self.ref_policy.eval().requires_grad_(False)
        shard_models(config, trained=(self.policy,), frozen=(self.ref_policy, *self.reward.models))

        total_updates = config.num_steps * config.num_iterations * config.num_mini_batches
        self.state = make_loop_state(
            config, self.policy, total_updates, len(self.data), self.score_norm, self.device, self.backend
        )
        self.loss_settings = PolicyLossSettings(config.cliprange, config.cliprange_high, config.dual_clip)
        self.advantage_settings = AdvantageSettings(gamma=config.gamma, scale_rewards=config.scale_rewards)
        self.run_dir = Path(config.output_dir)
        self._resumed_from: Path | None = None
        self.report_path: Path | None = None
        self.inputs = input_specs(policy=policy, tokenizer=tokenizer, prompts=prompts, reward=reward)

    @property
    def step(self) -> int:
        return self.state.step

    def resume(self, run_dir: str | Path | None = None) -> Path:
        """Restore everything from the newest checkpoint of ``run_dir`` (default: the config's output_dir)."""
        source = Path(run_dir) if run_dir is not None else self.run_dir
        self._resumed_from = load_run_checkpoint(source, self.policy, self.state, {})
        return self._resumed_from

    def _checkpoint(self) -> Path | None:
        keep = self.config.logging.save_total_limit
        args = (self.run_dir, self.policy, self.tokenizer, self.state, {}, keep)
        return save_run_checkpoint(self.backend, *args)

    # ------------------------------------------------------------------ 1. rollout

    def rollout(self, prompts: Sequence[str], policy_forward: bool = True) -> Rollout:
        """Sample one completion per row of ``prompts`` (already repeated G times) and run the no-grad forwards."""
        return self.rollout_of(self.generator(prompts), policy_forward)

    def rollout_of(self, generation: Generation, policy_forward: bool = True) -> Rollout:
        """The no-grad forwards over sampled responses; without ``policy_forward`` the sampler's logprobs and
        entropy stand in for the policy's (see :func:`tether.trainers.common.policy_forward_due`)."""
        return rollout_forwards(
            self.config,
            generation,
            self.policy,
            self.eos_token_ids,
            self.device,
            ref_policy=self.ref_policy,
            policy_forward=policy_forward,
        )

    # ------------------------------------------------------------------ 5. update

    def micro_batch_loss(
        self, batch: Rollout, advantages: torch.Tensor, normalizer: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch, already divided by the whole mini-batch's ``normalizer``."""
        cfg = self.config
        mask = batch.response_mask
        fwd = policy_logprobs(
            self.policy,
            batch.input_ids,
            batch.attention_mask,
            batch.prompt_length,
            cfg.sampling,
            self.eos_token_ids,
        )
        pg = policy_loss(cfg.policy_loss, fwd.logprobs, batch.logprobs, advantages, mask, self.loss_settings)
        loss = aggregate(pg.loss, mask, cfg.loss_aggregation, normalizer, cfg.aggregation_constant)
        stats = {  # token sums, divided by the tokens seen later; the losses are averaged over mini-batches
            "policy/loss": loss.detach(),
            "policy/approx_kl": approx_kl(fwd.model_logprobs, batch.model_logprobs, mask).sum(),
            "policy/clipfrac": pg.clipped.float().sum(),
            "policy/clipfrac_low": pg.clipped_low.float().sum(),
            "policy/clipfrac_high": pg.clipped_high.float().sum(),
        }
        kl_loss = kl_loss_term(cfg, self.ref_policy, batch, fwd, normalizer)
        if kl_loss is not None:
            loss = loss + self.state.kl_ctl.value * kl_loss
            stats["policy/kl_loss"] = kl_loss.detach()
        return loss, stats

    def update(
        self, rollout: Rollout, advantages: torch.Tensor, problems: list[str] | None = None
    ) -> dict[str, float]:
        """``num_iterations`` passes of mini-batch optimiser steps with micro-batch gradient accumulation; a
        mini-batch with a NaN / inf loss or gradient is skipped and named in ``problems``."""
        self.policy.train()

        def loss_of(rows: torch.Tensor, normalizer: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with autocast(self.device, self.config.mixed_precision):  # forwards only: backward runs outside
                return self.micro_batch_loss(*micro_batch_of(rollout, rows, advantages), normalizer)

        s = self.state
        return run_updates(
            self.config,
            rollout.response_mask,
            self.config.num_iterations,
            loss_of,
            self.policy.parameters,
            s.optimizer,
            s.scheduler,
            s.update_generator,
            PER_TOKEN_STATS,
            self.backend,
            s.grad_scaler,
            rollout.lengths(),
            problems,
        )

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict[str, float]]:
        """Run to ``total_episodes`` prompts; returns the per-step metrics (also in ``output_dir/metrics.jsonl``)."""
        cfg, state = self.config, self.state
        G = cfg.num_generations
        if self._resumed_from is None:
            on_main(self.backend, claim_run_dir, self.run_dir, cfg.overwrite_output_dir)
        out = open_run(
            cfg,
            self.run_dir,
            self.inputs,
            name="grpo",
            total_episodes=cfg.num_steps * cfg.rollout_batch_size,
            episode=state.episode,
            resumed_step=state.step if self._resumed_from is not None else None,
            max_new_tokens=cfg.sampling.max_new_tokens,
            is_main=self.backend.is_main,
            resumed_from=self._resumed_from,
        )
        self.health_warnings: list[HealthWarning] = []
        history: list[dict[str, float]] = []
        self.numerics = NonFiniteGuard(cfg.max_nonfinite_steps, self.backend.is_main)
        stop = StopSignals().install()
        try:
            while state.step < cfg.num_steps:
                t0 = time.perf_counter()
                # 1. rollout: the job's prompts for this step; this process samples its share, each prompt G times
                # in a row, so consecutive rows form a group
                indices = state.sampler.next_indices(cfg.rollout_batch_size)
                share = rank_slice(
                    len(indices), self.backend.rank, self.backend.world_size, "rollout_batch_size"
                )
                prompts, columns = self.data.select([i for i in indices[share] for _ in range(G)])
                generation = self.generator(prompts)
                t_gen = time.perf_counter()
                ro = self.rollout_of(generation, policy_forward_due(cfg, state.step, generation))
                completions = self.tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)

                # 2. score this process's rows, then stack every process's step (nothing to do in one process)
                reward_out = self.reward(prompts, completions, columns, step=state.step + 1)
                raw_scores = missing_eos_penalty(
                    reward_out.scores.to(self.device), ro.has_eos, cfg.missing_eos_penalty
                )
                local = StepBatch(ro, raw_scores, reward_out.components, prompts, completions)
                ro, raw_scores, components, prompts, completions = gather_step(
                    self.backend, local, self.tokenizer.pad_token_id, self.device
                )
                mask = ro.response_mask
                scores = shape_scores(raw_scores, self.score_norm, cfg.reward_clip)

                # 3. per-token rewards: the score, and -kl_coef * KL per token when the KL is placed in the reward
                kl_coef = state.kl_ctl.value
                kl = ro.kl if ro.kl is not None else torch.zeros_like(ro.logprobs)
                reward_kl_coef = kl_coef if cfg.kl.placement == "reward" else 0.0
                rewards, non_score = kl_shaped_rewards(scores, kl, mask, reward_kl_coef)

                # 4. advantages
                inputs = AdvantageInputs(rewards, mask, group_size=G)
                advantages = compute_advantages(cfg.advantage, inputs, self.advantage_settings).advantages
                t_rollout = time.perf_counter()

                # 5. update, unless its inputs hold NaN / inf (then skipped, and counted by the guard)
                problems = nonfinite_inputs({"advantages": advantages, **update_inputs(ro)}, mask)
                if problems:
                    update_stats = {"numerics/skipped_updates": float(cfg.num_iterations * cfg.num_mini_batches)}
                else:
                    update_stats = self.update(ro, advantages, problems)
                t_update = time.perf_counter()

                # 6. adaptive KL coefficient, on the mean per-sequence KL of this batch
                seq_kl = ro.kl.sum(-1) if ro.kl is not None else None  # [B * G]
                if seq_kl is not None and torch.isfinite(seq_kl).all():
                    state.kl_ctl.update(float(seq_kl.mean()), cfg.rollout_batch_size)

                # 7. log
                state.step += 1
                state.episode += cfg.rollout_batch_size
                metrics = rollout_metrics(ro, scores, components, kl_coef, show_components=True)
                metrics.update(group_metrics(scores, mask, ro.has_eos, G))
                metrics["objective/non_score_reward"] = float(non_score.sum(-1).mean())
                if scores is not raw_scores:
                    metrics["objective/raw_scores"] = float(raw_scores.mean())
                metrics.update(update_stats)
                times = StepTimes(t0, t_gen, t_rollout, t_update)
                row, warnings = record_step(
                    cfg,
                    out,
                    state,
                    metrics,
                    times,
                    float(mask.sum()),
                    SampleBatch(prompts, completions, scores, seq_kl, ro, self.tokenizer),
                    self._checkpoint,
                    GROUP_PROGRESS_KEYS,
                )
                history.append(row)
                self.health_warnings += warnings
                self.numerics.after_step(state.step, problems)
                stop_if_asked(stop, self.backend, cfg, state.step, self.run_dir, self._checkpoint, "grpo")
            save_final(self.backend, self.policy, self.tokenizer, self.run_dir)
        finally:
            stop.uninstall()
            out.progress.close()
            out.logger.close()
        self.report_path = on_main(self.backend, write_report, self.run_dir, cfg.logging.report)
        return history


def group_metrics(
    scores: torch.Tensor, response_mask: torch.Tensor, has_eos: torch.Tensor, G: int
) -> dict[str, float]:
    """Group and length metrics of a step: [B * G] scores, [B * G, T] mask, [B * G] has_eos.

    ``rollout/frac_reward_zero_std`` is the share of groups whose G scores are all equal: their advantages
    are 0 under a group baseline, so they carry no learning signal (all right or all wrong).
    """
    lengths = response_mask.sum(-1).float()
    m = {
        "rollout/response_length_min": float(lengths.min()),
        "rollout/response_length_max": float(lengths.max()),
        "rollout/truncated_fraction": float((~has_eos).float().mean()),
    }
    if G >= 2:
        std = scores.float().view(-1, G).std(-1)
        m["rollout/frac_reward_zero_std"] = float(torch.isclose(std, torch.zeros_like(std)).float().mean())
    return m
