"""PPO with a per-token KL penalty against a frozen reference model (the InstructGPT recipe).

One training step, top to bottom (``PPOTrainer.train``):

1. rollout   sample responses for a batch of prompts, then one no-grad forward each of the policy,
             the reference and the value model (dropout off) for logprobs, ref logprobs and values.
2. score     the reward of each (prompt, response); responses without EOS can be penalised.
3. rewards   per-token ``-kl_coef * KL`` plus the score on the last valid response token.
4. advantages  GAE over the shaped rewards and the values; optional whitening.
5. update    ``ppo_epochs`` passes of shuffled mini-batches, each split into micro-batches whose
             gradients are accumulated; clipped surrogate + clipped value loss.
6. KL coef   the adaptive controller (Ziegler et al. 2019) moves ``kl_coef`` toward the target KL.
7. log       metrics, sample tables, checkpoints.

Batch vocabulary (TRL name in brackets): ``rollout_batch_size`` prompts per step [batch_size];
``mini_batch_size`` sequences per optimiser step [local_mini_batch_size]; ``micro_batch_size``
sequences per forward/backward [per_device_train_batch_size]; gradient accumulation =
mini / micro [gradient_accumulation_steps].
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import yaml
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.advantages import gae, whiten_advantages
from tether.checkpoint import (
    latest_checkpoint,
    load_policy_weights,
    load_state,
    save_checkpoint,
    save_pretrained_atomic,
    set_rng_state,
)
from tether.config import ConfigError, KLConfig, LoggingConfig, save_yaml, to_dict
from tether.data import PromptData, PromptSampler, check_prompt_lengths, load_prompts
from tether.health import HealthMonitor, HealthWarning
from tether.kl import KL_ESTIMATORS, kl_full, kl_k1, kl_shaped_rewards, make_kl_controller
from tether.logging import Progress, build_loggers
from tether.logprobs import entropy_from_logits, response_logits, selective_log_softmax
from tether.losses import aggregate, approx_kl, loss_normalizer, ppo_clip_loss, value_loss
from tether.models import (
    ValueModel,
    disable_dropout,
    frozen_copy,
    load_causal_lm,
    load_tokenizer,
    mergeable_copy,
    pick_device,
    same_vocabulary,
)
from tether.ops import exact_div, masked_mean, masked_var, masked_whiten
from tether.report import build_report
from tether.rewards import Reward, RunningNorm, build_reward
from tether.rewards.model import uses_last_token_pooling
from tether.sampling import (
    SamplingConfig,
    biased_sampling_warning,
    check_sampling_config,
    generate,
    kl_biasing_settings,
    missing_eos_penalty,
    truncate_at_eos,
    warp_logits,
)
from tether.types import Rollout


class PolicyForward(NamedTuple):
    logprobs: torch.Tensor  # [b, T] under the distribution sampled from (the PPO ratio's logprobs)
    model_logprobs: torch.Tensor  # [b, T] under the policy's own distribution at the temperature (for KL)
    logits: torch.Tensor  # [b, T, V] raw logits predicting each response token


@dataclass
class PPOConfig:
    """Configuration of a PPO run. Defaults follow TRL's PPOConfig where TRL has one."""

    output_dir: str = "runs/ppo"
    """Run directory: config.yaml, metrics.jsonl, samples.jsonl, checkpoints/, final/."""
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that already holds a run (its logs, checkpoints and final/ are removed).
    Without it, such a directory is an error unless the run is resumed, so no earlier run is mixed or lost."""
    seed: int = 0
    """Seed for prompt order, sampling and updates; the same seed gives the same run on CPU."""
    learning_rate: float = 3e-6
    """AdamW learning rate for the policy and the value model."""
    total_episodes: int = 10_000
    """Prompts (episodes) to train on; steps = total_episodes // rollout_batch_size."""
    rollout_batch_size: int = 64
    """Prompts sampled per training step [TRL: batch_size]."""
    mini_batch_size: int = 16
    """Sequences per optimiser step [TRL: local_mini_batch_size]."""
    micro_batch_size: int = 16
    """Sequences per forward/backward; gradients are accumulated over mini/micro of them."""
    ppo_epochs: int = 4
    """Passes over each rollout batch [TRL: num_ppo_epochs]."""
    cliprange: float = 0.2
    """PPO ratio clip (low side, and high side unless cliprange_high is set)."""
    cliprange_high: float | None = None
    """Separate high-side ratio clip (DAPO's clip-higher); None = cliprange."""
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
    loss_aggregation: Literal["token-mean", "seq-mean"] = "token-mean"
    """How per-token losses are reduced; independent of how a mini-batch is split into micro-batches."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response that hit max_new_tokens without EOS; None = no penalty."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; None disables clipping."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_eps: float = 1e-5
    """AdamW epsilon (TRL and the N-implementation-details use 1e-5 rather than torch's 1e-8)."""
    lr_scheduler: Literal["linear", "constant"] = "linear"
    """Linear decay to 0 over the run (TRL's default) or a constant rate."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens are an error (naming the row)."""
    forward_batch_size: int | None = None
    """Sequences per no-grad rollout forward (policy, reference, value); None = micro_batch_size."""
    reward_batch_size: int = 16
    """Texts per reward-model forward."""
    reward_weights: list[float] | None = None
    """One weight per reward component when several are given (default 1.0 each)."""
    reward_baseline: Literal["none", "prompt"] = "none"
    """"prompt" scores r(prompt + response) - r(prompt): removes the part of the reward the policy cannot
    change (TRL Training FAQ, debugging: normalise a reward dominated by the prompt)."""
    reward_norm: bool = False
    """Normalise scores by the running mean/std of all scores seen so far."""
    reward_clip: float | None = None
    """Clip (normalised) scores to [-reward_clip, reward_clip]."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda", "cuda:1", ..."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.total_episodes < self.rollout_batch_size:
            raise ConfigError(
                f"total_episodes ({self.total_episodes}) must be at least rollout_batch_size ({self.rollout_batch_size})"
            )
        try:
            exact_div(self.rollout_batch_size, self.mini_batch_size, "rollout_batch_size / mini_batch_size")
            exact_div(self.mini_batch_size, self.micro_batch_size, "mini_batch_size / micro_batch_size")
        except ValueError as exc:
            raise ConfigError(f"batch sizes do not divide: {exc}") from None
        if self.ppo_epochs < 1:
            raise ConfigError(f"ppo_epochs must be >= 1, got {self.ppo_epochs}")
        if self.whiten_advantages and self.rollout_batch_size < 2:
            raise ConfigError("whiten_advantages needs rollout_batch_size >= 2")
        if self.sampling.allow_biased and self.kl.estimator not in ("k3", "full"):
            raise ConfigError(
                f"sampling.allow_biased=true needs kl.estimator 'k3' or 'full' (got {self.kl.estimator!r}): "
                "with warped sampling the k1/k2 estimates are biased, and k1 can go negative and be exploited"
            )

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.mini_batch_size // self.micro_batch_size

    @property
    def num_mini_batches(self) -> int:
        return self.rollout_batch_size // self.mini_batch_size

    @property
    def num_steps(self) -> int:
        return self.total_episodes // self.rollout_batch_size


#: What a run writes into its directory; a fresh run refuses a directory holding any of them.
RUN_DIR_OUTPUTS = ("metrics.jsonl", "samples.jsonl", "checkpoints", "final", "report.html", "tensorboard")
#: The run's inputs given as paths (policy, tokenizer, prompts, reward), so ``tether ppo --resume DIR`` needs no more.
INPUTS_FILE = "inputs.yaml"


def input_specs(**inputs: Any) -> dict[str, str | list[str]]:
    """The inputs given as paths or ``file.py:function`` strings (a list for composed rewards), as text.

    Model instances, functions and in-memory datasets cannot be written down; they are left out.
    """

    def absolute(spec: str | Path) -> str:
        # Relative paths are made absolute so a resume from another working directory finds them.
        text = str(spec)
        path, sep, fn = text.rpartition(":")
        if not (sep and path.endswith(".py")):  # a directory or file, not "file.py:function"
            path, sep, fn = text, "", ""
        return str(Path(path).resolve()) + sep + fn if Path(path).exists() else text

    out: dict[str, str | list[str]] = {}
    for name, value in inputs.items():
        if isinstance(value, str | Path):
            out[name] = absolute(value)
        elif isinstance(value, list | tuple) and value and all(isinstance(v, str | Path) for v in value):
            out[name] = [absolute(v) for v in value]
    return out


class PolicyAndValue(nn.Module):
    """Holds both trained networks so one optimiser and one grad-clip cover them (as TRL does)."""

    def __init__(self, policy: PreTrainedModel, value_model: ValueModel) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model


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
        check_sampling_config(config.sampling)
        warning = biased_sampling_warning(config.sampling)
        if warning:
            print(warning, file=sys.stderr)
        self.device = pick_device(config.device)
        torch.manual_seed(config.seed)

        self.policy = load_causal_lm(policy)
        self.tokenizer = load_tokenizer(tokenizer, policy)
        eos = self.tokenizer.eos_token_id
        self.eos_token_ids: list[int] = [eos] if isinstance(eos, int) else list(eos)
        self.data: PromptData = load_prompts(prompts)
        check_prompt_lengths(self.data, self.tokenizer, config.max_prompt_length)

        self.reward: Reward = (
            reward
            if isinstance(reward, Reward)
            else build_reward(
                reward,
                weights=config.reward_weights,
                baseline=config.reward_baseline,
                device=self.device,
                batch_size=config.reward_batch_size,
            )
        )
        self.score_norm = RunningNorm(clip=None, shift_mean=True) if config.reward_norm else None
        self.ref_policy = ref_policy if ref_policy is not None else frozen_copy(self.policy)
        if value_model is None:
            value_model = ValueModel.from_model(self._value_init_source())
        self.value_model = value_model
        for model in (self.policy, self.ref_policy, self.value_model):
            disable_dropout(model)
            model.to(self.device)
        self.ref_policy.eval().requires_grad_(False)

        self.model = PolicyAndValue(self.policy, self.value_model)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=config.learning_rate,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        total_updates = config.num_steps * config.ppo_epochs * config.num_mini_batches
        schedule: Callable[[int], float] = (
            (lambda i: max(0.0, 1.0 - i / total_updates)) if config.lr_scheduler == "linear" else (lambda i: 1.0)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.kl_ctl = make_kl_controller(config.kl.coef, config.kl.target, config.kl.horizon)
        self.sampler = PromptSampler(len(self.data), config.seed)
        self.update_generator = torch.Generator().manual_seed(config.seed + 1)
        self.step = 0
        self.episode = 0
        self.run_dir = Path(config.output_dir)
        self._resumed_from: Path | None = None
        # Inputs given as paths go to inputs.yaml, so that `tether ppo --resume DIR` needs nothing else.
        self.inputs = input_specs(policy=policy, tokenizer=tokenizer, prompts=prompts, reward=reward)

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
        ckpt = latest_checkpoint(Path(run_dir) if run_dir is not None else self.run_dir)
        state = load_state(ckpt)
        load_policy_weights(self.policy, ckpt)
        self.value_model.load_state_dict(state["value_model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.sampler.load_state_dict(state["sampler"])
        self.update_generator.set_state(state["update_generator"])
        self.step, self.episode = int(state["step"]), int(state["episode"])
        if self.score_norm is not None and state.get("score_norm") is not None:
            self.score_norm.load_state_dict(state["score_norm"])
        set_rng_state(state["rng"])
        self._resumed_from = ckpt
        return ckpt

    def _claim_run_dir(self) -> None:
        """Refuse to mix a new run into a directory holding another, unless overwrite_output_dir says so."""
        earlier = [name for name in RUN_DIR_OUTPUTS if (self.run_dir / name).exists()]
        if not earlier:
            return
        if not self.config.overwrite_output_dir:
            raise ConfigError(
                f"output_dir {self.run_dir} already holds a run ({', '.join(earlier)}); resume it with "
                "--resume, choose another output_dir, or set overwrite_output_dir=true to replace it"
            )
        for name in earlier:
            path = self.run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def _checkpoint(self) -> Path:
        state = {
            "value_model": self.value_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "sampler": self.sampler.state_dict(),
            "update_generator": self.update_generator.get_state(),
            "episode": self.episode,
            "score_norm": self.score_norm.state_dict() if self.score_norm is not None else None,
        }
        return save_checkpoint(
            self.run_dir, self.step, self.policy, self.tokenizer, state, self.config.logging.save_total_limit
        )

    # ------------------------------------------------------------------ 1. rollout

    @torch.inference_mode()
    def rollout(self, prompts: Sequence[str]) -> Rollout:
        """Sample one response per prompt and run the no-grad forwards. See step 1 of the module docstring."""
        cfg = self.config
        enc = self.tokenizer(list(prompts), padding=True, return_tensors="pt").to(self.device)
        prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
        P = prompt_ids.shape[1]
        self.policy.eval()
        gen = generate(
            self.policy,
            prompt_ids,
            prompt_mask,
            cfg.sampling,
            self.eos_token_ids,
            self.tokenizer.pad_token_id,
            output_scores=True,
        )
        cut = truncate_at_eos(gen.sequences[:, P:], self.eos_token_ids, self.tokenizer.pad_token_id)
        T = max(int(cut.response_mask.sum(-1).max().item()), 1)  # drop columns that are padding everywhere
        response_ids, response_mask = cut.response_ids[:, :T], cut.response_mask[:, :T]
        input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # [B, L]
        attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)  # [B, L]
        # What generate() sampled with: its scores are the processed (warped, temperature-scaled) logits.
        gen_scores = torch.stack(gen.scores[:T], dim=1)  # [B, T, V]
        gen_logprobs = selective_log_softmax(gen_scores, response_ids, 1.0).masked_fill(~response_mask, 0.0)
        del gen_scores

        chunk = cfg.forward_batch_size or cfg.micro_batch_size
        parts: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("lp", "model_lp", "ref_lp", "kl", "values", "ent", "exact_kl")
        }
        self.value_model.eval()
        for s in range(0, input_ids.shape[0], chunk):
            ids, att = input_ids[s : s + chunk], attention_mask[s : s + chunk]
            fwd = self._policy_forward(ids, att, P)
            ref_logits = response_logits(self.ref_policy, ids, att, P)
            ref_lp = selective_log_softmax(ref_logits, ids[:, P:], cfg.sampling.temperature)
            kl = self._kl(fwd.model_logprobs, ref_lp, fwd.logits, ref_logits)
            if cfg.kl.log_exact:
                exact = kl if cfg.kl.estimator == "full" else kl_full(fwd.logits, ref_logits, cfg.sampling.temperature)
                parts["exact_kl"].append(exact)
            del ref_logits
            parts["lp"].append(fwd.logprobs)
            parts["model_lp"].append(fwd.model_logprobs)
            parts["ref_lp"].append(ref_lp)
            parts["kl"].append(kl)
            parts["ent"].append(entropy_from_logits(fwd.logits, cfg.sampling.temperature))
            parts["values"].append(self.value_model(ids, att)[:, P - 1 : -1])  # value of the state before each token
        cat = {k: torch.cat(v) for k, v in parts.items() if v}
        # clone(): tensors made under inference_mode cannot be saved for backward in the update.
        return Rollout(
            input_ids=input_ids.clone(),
            attention_mask=attention_mask.clone(),
            response_mask=response_mask.clone(),
            prompt_length=P,
            logprobs=cat["lp"].clone(),
            model_logprobs=cat["model_lp"].clone(),
            ref_logprobs=cat["ref_lp"].clone(),
            kl=cat["kl"].masked_fill(~response_mask, 0.0).clone(),
            exact_kl=cat["exact_kl"].masked_fill(~response_mask, 0.0).clone() if "exact_kl" in cat else None,
            gen_logprobs=gen_logprobs.clone(),
            values=cat["values"].clone(),
            entropy=cat["ent"].clone(),
            has_eos=cut.has_eos.clone(),
        )

    def _policy_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, P: int) -> PolicyForward:
        """Policy logprobs of the response tokens: under the sampled distribution and the model's own.

        Both are at the sampling temperature. They differ only when ``sampling.allow_biased`` warps the
        sampling distribution (top-k, top-p, min_new_tokens); then the PPO ratio uses the warped one, so
        the ratio is that of the distribution that really generated the tokens.
        """
        sampling = self.config.sampling
        logits = response_logits(self.policy, input_ids, attention_mask, P)  # [b, T, V]
        response_ids = input_ids[:, P:]
        model_lp = selective_log_softmax(logits, response_ids, sampling.temperature)
        if sampling.allow_biased and kl_biasing_settings(sampling):
            warped = warp_logits(logits, sampling, self.eos_token_ids)
            lp = selective_log_softmax(warped, response_ids, 1.0)
        else:
            lp = model_lp
        return PolicyForward(lp, model_lp, logits)

    def _kl(
        self,
        model_logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        logits: torch.Tensor,
        ref_logits: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-token KL of the configured estimator, [b, T]; ``full`` needs the reference logits."""
        if self.config.kl.estimator == "full":
            if ref_logits is None:
                raise ValueError("the full KL needs the reference logits")
            return kl_full(logits, ref_logits, self.config.sampling.temperature)
        return KL_ESTIMATORS[self.config.kl.estimator](model_logprobs, ref_logprobs)

    # ------------------------------------------------------------------ 5. update

    def micro_batch_loss(
        self, batch: Rollout, advantages: torch.Tensor, returns: torch.Tensor, normalizer: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch, already divided by the whole mini-batch's ``normalizer``."""
        cfg = self.config
        P, mask = batch.prompt_length, batch.response_mask
        fwd = self._policy_forward(batch.input_ids, batch.attention_mask, P)
        new_values = self.value_model(batch.input_ids, batch.attention_mask)[:, P - 1 : -1]
        pg = ppo_clip_loss(fwd.logprobs, batch.logprobs, advantages, mask, cfg.cliprange, cfg.cliprange_high)
        vf = value_loss(new_values, batch.values, returns, mask, cfg.cliprange_value)
        agg = cfg.loss_aggregation
        pg_loss = aggregate(pg.loss, mask, agg, normalizer)
        vf_loss = aggregate(vf.loss, mask, agg, normalizer)
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
        # The KL goes into the loss when placed there, and also for the exact KL in the reward: a
        # per-token reward -beta * KL(pi(.|s_t) || ref(.|s_t)) does not depend on the sampled token, so the
        # policy gradient only sees its effect on later states; the direct gradient of KL at s_t must be
        # added as a loss term to get the gradient of the KL-regularised objective.
        if cfg.kl.placement == "loss" or cfg.kl.estimator == "full":
            ref_logits = None
            if cfg.kl.estimator == "full":  # the exact KL needs the reference's whole distribution again
                with torch.no_grad():
                    ref_logits = response_logits(self.ref_policy, batch.input_ids, batch.attention_mask, P)
            kl = self._kl(fwd.model_logprobs, batch.ref_logprobs, fwd.logits, ref_logits)
            kl_loss = aggregate(kl, mask, agg, normalizer)
            loss = loss + self.kl_ctl.value * kl_loss
            stats["policy/kl_loss"] = kl_loss.detach()
        return loss, stats

    def update(self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        """``ppo_epochs`` passes of mini-batch optimiser steps with micro-batch gradient accumulation."""
        cfg = self.config
        B = rollout.input_ids.shape[0]
        self.model.train()
        totals: dict[str, float] = {}
        n_tokens_total = 0.0
        n_minibatches = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=self.update_generator).to(self.device)
            for start in range(0, B, cfg.mini_batch_size):
                mb = order[start : start + cfg.mini_batch_size]
                normalizer = loss_normalizer(rollout.response_mask[mb], cfg.loss_aggregation)
                self.optimizer.zero_grad(set_to_none=True)
                for micro_start in range(0, len(mb), cfg.micro_batch_size):
                    idx = mb[micro_start : micro_start + cfg.micro_batch_size]
                    loss, stats = self.micro_batch_loss(rollout.index(idx), advantages[idx], returns[idx], normalizer)
                    loss.backward()
                    for k, v in stats.items():
                        totals[k] = totals.get(k, 0.0) + float(v)
                if cfg.max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                n_tokens_total += float(rollout.response_mask[mb].sum())
                n_minibatches += 1
        per_token = ("policy/approx_kl", "policy/clipfrac", "value/clipfrac")
        return {
            k: v / max(n_tokens_total, 1.0) if k in per_token else v / n_minibatches for k, v in totals.items()
        }

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict[str, float]]:
        """Run to ``total_episodes``; returns the per-step metrics (also in ``output_dir/metrics.jsonl``)."""
        cfg = self.config
        if self._resumed_from is None:
            self._claim_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, self.run_dir / "config.yaml")
        if self.inputs:
            (self.run_dir / INPUTS_FILE).write_text(yaml.safe_dump(self.inputs, sort_keys=False))
        logger = build_loggers(
            cfg.logging.report_to,
            self.run_dir,
            to_dict(cfg),
            console_every=cfg.logging.logging_steps,
            start_step=self.step if self._resumed_from is not None else None,
        )
        progress = Progress(
            cfg.num_steps * cfg.rollout_batch_size, "ppo", cfg.logging.progress_bar, initial=self.episode
        )
        health = HealthMonitor(max_new_tokens=cfg.sampling.max_new_tokens)
        self.health_warnings: list[HealthWarning] = []
        history: list[dict[str, float]] = []
        try:
            while self.step < cfg.num_steps:
                t0 = time.perf_counter()
                # 1. rollout
                indices = self.sampler.next_indices(cfg.rollout_batch_size)
                prompts, columns = self.data.select(indices)
                ro = self.rollout(prompts)
                mask = ro.response_mask
                responses = self.tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)
                t_gen = time.perf_counter()

                # 2. score
                reward_out = self.reward(prompts, responses, columns)
                raw_scores = missing_eos_penalty(reward_out.scores.to(self.device), ro.has_eos, cfg.missing_eos_penalty)
                scores = self._shape_scores(raw_scores)

                # 3. KL-shaped per-token rewards
                kl = ro.kl  # [B, T], 0 outside the mask
                kl_coef = self.kl_ctl.value
                # With the KL as a loss term (kl.placement = "loss") the reward carries the score alone.
                reward_kl_coef = kl_coef if cfg.kl.placement == "reward" else 0.0
                rewards, non_score = kl_shaped_rewards(scores, kl, mask, reward_kl_coef)
                if cfg.whiten_rewards:
                    rewards = masked_whiten(rewards, mask, shift_mean=False)

                # 4. advantages
                advantages, returns = gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
                if cfg.whiten_advantages:
                    advantages = whiten_advantages(advantages, mask)
                t_rollout = time.perf_counter()

                # 5. update
                update_stats = self.update(ro, advantages, returns)
                t_update = time.perf_counter()

                # 6. adaptive KL coefficient, on the mean per-sequence KL of this batch
                seq_kl = kl.sum(-1)  # [B]
                self.kl_ctl.update(float(seq_kl.mean()), cfg.rollout_batch_size)

                # 7. log
                self.step += 1
                self.episode += cfg.rollout_batch_size
                metrics = self._metrics(ro, scores, reward_out.components, seq_kl, non_score, returns, kl_coef)
                if scores is not raw_scores:
                    metrics["objective/raw_scores"] = float(raw_scores.mean())
                metrics.update(update_stats)
                n_gen_tokens = float(mask.sum())
                metrics.update(
                    {
                        "lr": self.scheduler.get_last_lr()[0],
                        "time/rollout_s": t_rollout - t0,
                        "time/update_s": t_update - t_rollout,
                        "perf/episodes_per_s": cfg.rollout_batch_size / (t_update - t0),
                        "perf/gen_tokens_per_s": n_gen_tokens / max(t_gen - t0, 1e-9),
                    }
                )
                record = {"episode": self.episode, **metrics}
                logger.log_metrics(record, self.step)
                history.append({"step": self.step, **record})
                for warning in health.update(metrics, self.step):
                    self.health_warnings.append(warning)
                    progress.write(str(warning))
                if cfg.logging.sample_steps > 0 and (self.step % cfg.logging.sample_steps == 0 or self.step == 1):
                    rows = self._sample_rows(prompts, responses, scores, seq_kl)
                    logger.log_samples(rows, self.step)
                progress.update(
                    cfg.rollout_batch_size,
                    {k: metrics[k] for k in ("objective/scores", "objective/kl", "kl/coef")},
                )
                if cfg.logging.save_steps > 0 and self.step % cfg.logging.save_steps == 0:
                    self._checkpoint()
            # A LoRA policy is saved merged, so final/ loads with AutoModelForCausalLM.from_pretrained.
            save_pretrained_atomic(mergeable_copy(self.policy), self.tokenizer, self.run_dir / "final")
        finally:
            progress.close()
            logger.close()
        if cfg.logging.report:
            self.report_path = build_report([self.run_dir])
        return history

    def _shape_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Optional running normalisation, then clipping, of the sequence scores [B]."""
        if self.score_norm is not None:
            self.score_norm.update(scores)
            if self.score_norm.count >= 2:
                scores = self.score_norm.normalize(scores)
        if self.config.reward_clip is not None:
            scores = scores.clamp(-self.config.reward_clip, self.config.reward_clip)
        return scores

    # ------------------------------------------------------------------ metrics

    def _metrics(
        self,
        ro: Rollout,
        scores: torch.Tensor,
        components: dict[str, torch.Tensor],
        seq_kl: torch.Tensor,
        non_score: torch.Tensor,
        returns: torch.Tensor,
        kl_coef: float,
    ) -> dict[str, float]:
        mask = ro.response_mask
        seq_k1 = kl_k1(ro.model_logprobs, ro.ref_logprobs).masked_fill(~mask, 0.0).sum(-1)
        # Rollout/trainer agreement: what generate() sampled with vs the training forward (same tokens).
        logprob_diff = (ro.gen_logprobs - ro.logprobs).abs().masked_fill(~mask, 0.0)
        non_score_reward = non_score.sum(-1)
        residual_var = masked_var(returns - ro.values, mask) if mask.sum() > 1 else torch.tensor(float("nan"))
        returns_var = masked_var(returns, mask) if mask.sum() > 1 else torch.tensor(float("nan"))
        m = {
            "objective/scores": float(scores.mean()),
            "objective/scores_std": float(scores.std()) if scores.numel() > 1 else 0.0,
            "objective/kl": float(seq_kl.mean()),
            "objective/non_score_reward": float(non_score_reward.mean()),
            "objective/rlhf_reward": float((scores + non_score_reward).mean()),
            "objective/entropy": float(masked_mean(ro.entropy, mask)) if mask.any() else 0.0,
            "kl/coef": kl_coef,
            "kl/negative_fraction": float((seq_k1 < 0).float().mean()),
            "kl/k1": float(seq_k1.mean()),
            **({"kl/exact": float(ro.exact_kl.sum(-1).mean())} if ro.exact_kl is not None else {}),
            "value/explained_variance": float(1.0 - residual_var / returns_var),
            "rollout/response_length": float(mask.sum(-1).float().mean()),
            "rollout/eos_fraction": float(ro.has_eos.float().mean()),
            "rollout/logprob_diff_max": float(logprob_diff.max()),
            "rollout/logprob_diff_mean": float(logprob_diff.sum() / mask.sum().clamp(min=1)),
        }
        if len(components) > 1 or self.config.reward_baseline != "none":
            for name, values in components.items():
                m[f"rewards/{name}/mean"] = float(values.mean())
                m[f"rewards/{name}/std"] = float(values.std()) if values.numel() > 1 else 0.0
        return m

    def _sample_rows(
        self, prompts: Sequence[str], responses: Sequence[str], scores: torch.Tensor, seq_kl: torch.Tensor
    ) -> list[dict[str, Any]]:
        n = min(self.config.logging.num_sample_rows, len(prompts))
        return [
            {"prompt": prompts[i], "response": responses[i], "score": float(scores[i]), "kl": float(seq_kl[i])}
            for i in range(n)
        ]



PPO_HELP = """usage: tether ppo [--preset NAME] [--config run.yaml] --policy DIR --reward SPEC [--reward SPEC ...] --prompts FILE
                 [--reward_weights W1,W2] [--output_dir DIR] [--resume RUN_DIR] [--field value ...]

  --policy DIR       a causal LM directory (save_pretrained format); its tokenizer is loaded from it
  --reward SPEC      a reward-model directory or FILE.py:FUNCTION; repeat to compose rewards
  --reward_weights   comma-separated weights, one per --reward (default 1.0 each)
  --prompts FILE     JSONL/CSV/Parquet with a `prompt` column (other columns reach reward functions)
  --resume RUN_DIR   continue from the newest checkpoint of RUN_DIR (its config.yaml and inputs.yaml are used)
  --preset NAME      start from a packaged preset (below); --config and --field value go on top of it
  --field value      any PPOConfig field, e.g. --learning_rate 1e-5 --sampling.max_new_tokens 32 --kl.coef 0.1
"""


def main(argv: Sequence[str]) -> int:
    """``tether ppo``: build the config from YAML + overrides, then train."""
    from tether.config import config_help, load_config, split_args, take_repeated
    from tether.presets import preset_names, preset_path, preset_summary

    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(PPO_HELP)
        print("presets (--preset NAME, under --config and --field value):")
        for name in preset_names():
            print(f"  {name:<12} {preset_summary(name)}")
        print("\nPPOConfig fields (set in the YAML file or as --field value):")
        print("\n".join(config_help(PPOConfig)))
        return 0
    # --reward may repeat (composition); the generic parser keeps one value per key
    rewards, rest = take_repeated(argv, "reward")
    given = split_args(rest)  # what the command line names (dashes already read as underscores)
    resume = given.get("resume")
    saved: dict[str, Any] = {}
    if resume is not None:
        # Resuming reads the run's own config.yaml and inputs.yaml; what the command line gives overrides them.
        if "preset" in given:
            raise ConfigError("--preset starts a new run; a resumed run keeps the config in its config.yaml")
        run = Path(resume)
        if not (run / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; is it a tether ppo run directory?")
        if "config" not in given:
            rest = ["--config", str(run / "config.yaml"), *rest]
        if (run / INPUTS_FILE).is_file():
            saved = yaml.safe_load((run / INPUTS_FILE).read_text()) or {}
    preset = preset_path(given["preset"]) if "preset" in given else None
    cfg, extra = load_config(
        PPOConfig, rest, extra=("policy", "prompts", "resume", "tokenizer", "preset"), base_file=preset
    )
    if resume is not None and "output_dir" not in given:
        cfg.output_dir = resume  # resuming writes into the run being resumed
    for name in ("policy", "prompts", "tokenizer"):
        if name not in extra and name in saved:
            extra[name] = saved[name]
    if not rewards and "reward" in saved:
        rewards = saved["reward"] if isinstance(saved["reward"], list) else [saved["reward"]]
    for name in ("policy", "prompts"):
        if name not in extra:
            raise ConfigError(f"tether ppo needs --{name}")
    if not rewards:
        raise ConfigError("tether ppo needs --reward (a reward-model directory or FILE.py:FUNCTION)")
    # The trainer builds the reward from the config (weights, baseline, device), so config.yaml describes the run.
    reward = rewards if len(rewards) > 1 else rewards[0]
    trainer = PPOTrainer(
        cfg, policy=extra["policy"], reward=reward, prompts=extra["prompts"], tokenizer=extra.get("tokenizer")
    )
    if resume is not None:
        ckpt = trainer.resume(resume)
        print(f"resumed from {ckpt} (step {trainer.step})")
    trainer.train()
    print(f"run directory: {trainer.run_dir}\nfinal model:   {trainer.run_dir / 'final'}")
    return 0
