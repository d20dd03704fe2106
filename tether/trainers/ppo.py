"""PPO with a per-token KL penalty against a frozen reference model (the InstructGPT recipe).

One training step, top to bottom (``PPOTrainer.train``):

1. rollout   sample responses for a batch of prompts (``tether.rollout``), then one no-grad forward each of
             the policy, the reference and the value model (dropout off) for logprobs, ref logprobs and values.
2. score     the reward of each (prompt, response); responses without EOS can be penalised.
3. rewards   per-token ``-kl_coef * KL`` plus the score on the last valid response token.
4. advantages  GAE over the shaped rewards and the values; optional whitening.
5. update    ``ppo_epochs`` passes of shuffled mini-batches, each split into micro-batches whose
             gradients are accumulated; clipped surrogate + clipped value loss.
6. KL coef   the adaptive controller (Ziegler et al. 2019) moves ``kl_coef`` toward the target KL.
7. log       metrics, sample tables, checkpoints.

Batch vocabulary: see :class:`tether.config.RLConfig`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.advantages import gae, whiten_advantages
from tether.backend import autocast, enable_gradient_checkpointing, on_main, rank_slice
from tether.config import ConfigError, RLConfig
from tether.health import HealthWarning
from tether.kl import kl_shaped_rewards
from tether.logprobs import align_with_response, policy_logprobs
from tether.losses import aggregate, approx_kl, ppo_clip_loss, value_loss
from tether.models import ValueModel, disable_dropout, frozen_copy, same_vocabulary
from tether.numerics import NonFiniteGuard, nonfinite_inputs
from tether.ops import masked_var, masked_whiten
from tether.rewards.model import uses_last_token_pooling
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
class PPOConfig(RLConfig):
    """Configuration of a PPO run. Defaults follow TRL's PPOConfig where TRL has one."""

    output_dir: str = "runs/ppo"
    """Run directory: config.yaml, metrics.jsonl, samples.jsonl, checkpoints/, final/."""
    ppo_epochs: int = 4
    """Passes over each rollout batch [TRL: num_ppo_epochs]."""
    cliprange_value: float | None = 0.2
    """Value clip around the rollout's values; None disables value clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance (mean kept) before GAE."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean / unit variance over the batch's response tokens."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ppo_epochs < 1:
            raise ConfigError(f"ppo_epochs must be >= 1, got {self.ppo_epochs}")
        if self.whiten_advantages and self.rollout_batch_size < 2:
            raise ConfigError("whiten_advantages needs rollout_batch_size >= 2")


class PolicyAndValue(nn.Module):
    """Holds both trained networks so one optimiser and one grad-clip cover them (as TRL does)."""

    def __init__(self, policy: PreTrainedModel, value_model: ValueModel) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model


#: Statistics of ``micro_batch_loss`` that are sums over tokens (divided by the tokens seen, not the mini-batches).
PER_TOKEN_STATS = frozenset({"policy/approx_kl", "policy/clipfrac", "value/clipfrac"})


class PPOTrainer:
    """PPO-with-KL trainer. See the module docstring for the loop.

    Args:
        config: a :class:`PPOConfig`.
        policy: a causal LM (``AutoModelForCausalLM`` directory or instance).
        tokenizer: its tokenizer (loaded from the policy's directory when omitted).
        reward: a reward function ``(prompts, responses, **columns) -> list[float]``, ``"file.py:fn"``,
            a reward-model directory / ``(model, tokenizer)`` tuple, a list of those, or a built
            :class:`tether.rewards.Reward`.
        prompts: a list of strings, a ``datasets.Dataset`` or a JSONL/CSV/Parquet file with a ``prompt``
            column; other columns are passed to reward functions by name.
        ref_policy: the frozen reference; a frozen copy of the policy when omitted.
        value_model: a :class:`ValueModel`; built from the reward model when it is a causal model with
            the policy's vocabulary, else from the policy, with a zero-initialised head.
    """

    def __init__(
        self,
        config: PPOConfig,
        policy: str | Path | PreTrainedModel,
        reward: Any,
        prompts: Any,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        ref_policy: PreTrainedModel | None = None,
        value_model: ValueModel | None = None,
    ) -> None:
        self.config = config
        inputs = load_rl_inputs(config, "ppo", policy, reward, prompts, tokenizer)
        self.backend, self.device = inputs.backend, inputs.device
        self.policy, self.tokenizer = inputs.policy, inputs.tokenizer
        self.data, self.reward, self.score_norm = inputs.data, inputs.reward, inputs.score_norm
        self.generator = HFGenerator(
            self.policy, self.tokenizer, config.sampling, add_special_tokens=not self.data.chat
        )
        self.eos_token_ids = self.generator.eos_token_ids
        self.ref_policy = ref_policy if ref_policy is not None else frozen_copy(self.policy)
        if value_model is None:
            value_model = ValueModel.from_model(self._value_init_source())
        self.value_model = value_model
        if config.gradient_checkpointing and hasattr(value_model.backbone, "supports_gradient_checkpointing"):
            enable_gradient_checkpointing(value_model.backbone)
        for model in (self.policy, self.ref_policy, self.value_model):
            disable_dropout(model)
            model.to(self.device)
        self.ref_policy.eval().requires_grad_(False)
        frozen = (self.ref_policy, *self.reward.models)
        shard_models(config, trained=(self.policy, self.value_model), frozen=frozen)

        self.model = PolicyAndValue(self.policy, self.value_model)
        total_updates = config.num_steps * config.ppo_epochs * config.num_mini_batches
        self.state = make_loop_state(
            config, self.model, total_updates, len(self.data), self.score_norm, self.device, self.backend
        )
        self.run_dir = Path(config.output_dir)
        self._resumed_from: Path | None = None
        self.report_path: Path | None = None
        # Inputs given as paths go to inputs.yaml, so that `tether ppo --resume DIR` needs nothing else.
        self.inputs = input_specs(policy=policy, tokenizer=tokenizer, prompts=prompts, reward=reward)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.state.optimizer

    @property
    def kl_ctl(self) -> Any:
        return self.state.kl_ctl

    # ------------------------------------------------------------------ set-up helpers

    def _value_init_source(self) -> PreTrainedModel:
        """The reward model when it is a decoder that reads the policy's tokens, else the policy.

        A value model must read the policy's token ids causally (a bidirectional encoder would let the
        value of a position see the tokens after it), so an encoder reward model or one with another
        vocabulary is not a valid starting point.
        """
        for model, tok in zip(self.reward.models, self.reward.tokenizers, strict=True):
            if uses_last_token_pooling(model) and same_vocabulary(tok, self.tokenizer):
                return model
        return self.policy

    def resume(self, run_dir: str | Path | None = None) -> Path:
        """Restore everything from the newest checkpoint of ``run_dir`` (default: the config's output_dir)."""
        source = Path(run_dir) if run_dir is not None else self.run_dir
        self._resumed_from = load_run_checkpoint(
            source, self.policy, self.state, {"value_model": self.value_model}
        )
        return self._resumed_from

    def _checkpoint(self) -> Path | None:
        keep = self.config.logging.save_total_limit
        args = (
            self.run_dir,
            self.policy,
            self.tokenizer,
            self.state,
            {"value_model": self.value_model},
            keep,
        )
        return save_run_checkpoint(self.backend, *args)

    # ------------------------------------------------------------------ 1. rollout

    def rollout(self, prompts: Sequence[str], policy_forward: bool = True) -> Rollout:
        """Sample one response per prompt and run the no-grad forwards. See step 1 of the module docstring."""
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
            value_model=self.value_model,
            policy_forward=policy_forward,
        )

    # ------------------------------------------------------------------ 5. update

    def micro_batch_loss(
        self, batch: Rollout, advantages: torch.Tensor, returns: torch.Tensor, normalizer: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch, already divided by the whole mini-batch's ``normalizer``."""
        cfg = self.config
        P, mask = batch.prompt_length, batch.response_mask
        assert batch.values is not None  # PPO's rollouts always carry values
        fwd = policy_logprobs(
            self.policy, batch.input_ids, batch.attention_mask, P, cfg.sampling, self.eos_token_ids
        )
        new_values = align_with_response(self.value_model(batch.input_ids, batch.attention_mask), P)
        pg = ppo_clip_loss(fwd.logprobs, batch.logprobs, advantages, mask, cfg.cliprange, cfg.cliprange_high)
        vf = value_loss(new_values, batch.values, returns, mask, cfg.cliprange_value)
        agg, const = cfg.loss_aggregation, cfg.aggregation_constant
        pg_loss = aggregate(pg.loss, mask, agg, normalizer, const)
        vf_loss = aggregate(vf.loss, mask, agg, normalizer, const)
        loss = pg_loss + cfg.vf_coef * vf_loss
        # Monitored on the policy's own distribution: under top-k/top-p a token can leave the new warped
        # support, which makes the warped KL infinite although the policy moved only a little.
        policy_kl = approx_kl(fwd.model_logprobs, batch.model_logprobs, mask)
        stats = {  # sums over this micro-batch's tokens; divided by the mini-batch token count later
            "policy/loss": pg_loss.detach(),
            "value/loss": vf_loss.detach(),
            "policy/approx_kl": policy_kl.sum(),
            "policy/clipfrac": pg.clipped.float().sum(),
            "value/clipfrac": vf.clipped.float().sum(),
        }
        kl_loss = kl_loss_term(cfg, self.ref_policy, batch, fwd, normalizer)
        if kl_loss is not None:
            loss = loss + self.kl_ctl.value * kl_loss
            stats["policy/kl_loss"] = kl_loss.detach()
        return loss, stats

    def update(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        problems: list[str] | None = None,
    ) -> dict[str, float]:
        """``ppo_epochs`` passes of mini-batch optimiser steps with micro-batch gradient accumulation; a
        mini-batch with a NaN / inf loss or gradient is skipped and named in ``problems``."""
        self.model.train()

        def loss_of(rows: torch.Tensor, normalizer: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with autocast(self.device, self.config.mixed_precision):  # forwards only: backward runs outside
                return self.micro_batch_loss(*micro_batch_of(rollout, rows, advantages, returns), normalizer)

        s = self.state
        return run_updates(
            self.config,
            rollout.response_mask,
            self.config.ppo_epochs,
            loss_of,
            self.model.parameters,
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
        """Run to ``total_episodes``; returns the per-step metrics (also in ``output_dir/metrics.jsonl``)."""
        cfg, state = self.config, self.state
        if self._resumed_from is None:
            on_main(self.backend, claim_run_dir, self.run_dir, cfg.overwrite_output_dir)
        out = open_run(
            cfg,
            self.run_dir,
            self.inputs,
            name="ppo",
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
                # 1. rollout: the job's prompts for this step; this process samples its share
                indices = state.sampler.next_indices(cfg.rollout_batch_size)
                share = rank_slice(
                    len(indices), self.backend.rank, self.backend.world_size, "rollout_batch_size"
                )
                prompts, columns = self.data.select(indices[share])
                generation = self.generator(prompts)
                t_gen = time.perf_counter()
                ro = self.rollout_of(generation, policy_forward_due(cfg, state.step, generation))
                responses = self.tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)

                # 2. score this process's rows, then stack every process's step (nothing to do in one process)
                reward_out = self.reward(prompts, responses, columns, step=state.step + 1)
                raw_scores = missing_eos_penalty(
                    reward_out.scores.to(self.device), ro.has_eos, cfg.missing_eos_penalty
                )
                local = StepBatch(ro, raw_scores, reward_out.components, prompts, responses)
                ro, raw_scores, components, prompts, responses = gather_step(
                    self.backend, local, self.tokenizer.pad_token_id, self.device
                )
                mask = ro.response_mask
                scores = shape_scores(raw_scores, self.score_norm, cfg.reward_clip)

                # 3. KL-shaped per-token rewards
                assert ro.kl is not None and ro.values is not None  # PPO always has a reference and values
                kl_coef = self.kl_ctl.value
                # With the KL as a loss term (kl.placement = "loss") the reward carries the score alone.
                reward_kl_coef = kl_coef if cfg.kl.placement == "reward" else 0.0
                rewards, non_score = kl_shaped_rewards(scores, ro.kl, mask, reward_kl_coef)
                if cfg.whiten_rewards:
                    rewards = masked_whiten(rewards, mask, shift_mean=False)

                # 4. advantages
                advantages, returns = gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
                if cfg.whiten_advantages:
                    advantages = whiten_advantages(advantages, mask)
                t_rollout = time.perf_counter()

                # 5. update, unless its inputs hold NaN / inf (then skipped, and counted by the guard)
                problems = nonfinite_inputs(
                    {"advantages": advantages, "returns": returns, "values": ro.values, **update_inputs(ro)}, mask
                )
                if problems:
                    update_stats = {"numerics/skipped_updates": float(cfg.ppo_epochs * cfg.num_mini_batches)}
                else:
                    update_stats = self.update(ro, advantages, returns, problems)
                t_update = time.perf_counter()

                # 6. adaptive KL coefficient, on the mean per-sequence KL of this batch
                seq_kl = ro.kl.sum(-1)  # [B]
                if torch.isfinite(seq_kl).all():
                    self.kl_ctl.update(float(seq_kl.mean()), cfg.rollout_batch_size)

                # 7. log
                state.step += 1
                state.episode += cfg.rollout_batch_size
                metrics = self._metrics(ro, scores, components, non_score, returns, kl_coef)
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
                    SampleBatch(prompts, responses, scores, seq_kl, ro, self.tokenizer),
                    self._checkpoint,
                    ("objective/scores", "objective/kl", "kl/coef"),
                )
                history.append(row)
                self.health_warnings += warnings
                self.numerics.after_step(state.step, problems)
                stop_if_asked(stop, self.backend, cfg, state.step, self.run_dir, self._checkpoint, "ppo")
            save_final(self.backend, self.policy, self.tokenizer, self.run_dir)
        finally:
            stop.uninstall()
            out.progress.close()
            out.logger.close()
        self.report_path = on_main(self.backend, write_report, self.run_dir, cfg.logging.report)
        return history

    # ------------------------------------------------------------------ metrics

    def _metrics(
        self,
        ro: Rollout,
        scores: torch.Tensor,
        components: dict[str, torch.Tensor],
        non_score: torch.Tensor,
        returns: torch.Tensor,
        kl_coef: float,
    ) -> dict[str, float]:
        mask = ro.response_mask
        assert ro.values is not None
        show = len(components) > 1 or self.config.reward_baseline != "none"
        m = rollout_metrics(ro, scores, components, kl_coef, show)
        non_score_reward = non_score.sum(-1)
        residual_var = masked_var(returns - ro.values, mask) if mask.sum() > 1 else torch.tensor(float("nan"))
        returns_var = masked_var(returns, mask) if mask.sum() > 1 else torch.tensor(float("nan"))
        m["objective/non_score_reward"] = float(non_score_reward.mean())
        m["objective/rlhf_reward"] = float((scores + non_score_reward).mean())
        m["value/explained_variance"] = float(1.0 - residual_var / returns_var)
        return m
