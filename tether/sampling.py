"""Sampling settings with the Training FAQ's safe defaults, generation, and the KL-safety check.

The KL penalty and the PPO ratio assume every response token was drawn from the policy's own
distribution at the sampling temperature. Settings that change the distribution actually sampled
from (top-k, top-p < 1, min_length, repetition penalty, suppressed EOS, greedy or beam search) make
the sampled tokens come from a *different* distribution: the k1 estimate ``log p - log p_ref`` can
then be negative on average, and since the total reward is ``r - beta * KL``, the policy is paid for
driving the KL negative instead of learning the reward (TRL Training FAQ, "negative KL").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import GenerationConfig

from tether.ops import first_true_index


class KLBiasError(ValueError):
    """A generation setting would bias the KL estimate."""


@dataclass
class SamplingConfig:
    """How responses are sampled during rollouts. Defaults are pure sampling (TRL Training FAQ)."""

    max_new_tokens: int = 32
    """Maximum response length in tokens (TRL: response_length / max_new_tokens)."""
    temperature: float = 1.0
    """Sampling temperature; the policy and reference logprobs are computed at this temperature too."""
    top_k: int = 0
    """0 disables top-k. Any other value biases the KL estimate and is refused."""
    top_p: float = 1.0
    """1.0 disables nucleus sampling. Values below 1 bias the KL estimate and are refused."""
    min_new_tokens: int = 0
    """0 allows EOS from the first token. A minimum suppresses EOS and biases the KL estimate."""
    repetition_penalty: float = 1.0
    """1.0 disables it. Other values reshape the distribution and are refused."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")


def kl_biasing_settings(cfg: SamplingConfig) -> list[str]:
    """Names and values of the settings in ``cfg`` that make sampling differ from the model distribution."""
    found = []
    if cfg.top_k not in (0, None):
        found.append(f"top_k={cfg.top_k}")
    if cfg.top_p is not None and cfg.top_p < 1.0:
        found.append(f"top_p={cfg.top_p}")
    if cfg.min_new_tokens and cfg.min_new_tokens > 0:
        found.append(f"min_new_tokens={cfg.min_new_tokens}")
    if cfg.repetition_penalty != 1.0:
        found.append(f"repetition_penalty={cfg.repetition_penalty}")
    return found


def check_sampling_config(cfg: SamplingConfig) -> None:
    """Refuse settings that bias the KL estimate, with the reason."""
    bad = kl_biasing_settings(cfg)
    if bad:
        raise KLBiasError(
            f"refusing sampling settings {', '.join(bad)}: they sample tokens from a distribution other than "
            "the policy's own, so the per-token KL estimate log p_policy - log p_ref is biased and can go "
            "negative; because the reward is score - kl_coef * KL, the policy is then paid for driving the "
            "KL negative instead of learning the reward (TRL Training FAQ, 'negative KL'). Use pure sampling: "
            "top_k=0, top_p=1.0, min_new_tokens=0, repetition_penalty=1.0."
        )


def generation_config(cfg: SamplingConfig, eos_token_id: int | list[int], pad_token_id: int) -> GenerationConfig:
    """A GenerationConfig with every distribution-changing field set explicitly.

    Nothing is left to the model's ``generation_config.json`` or to transformers' global defaults
    (which include ``top_k=50``).
    """
    return GenerationConfig(
        do_sample=True,
        num_beams=1,
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens or None,
        min_length=0,
        temperature=cfg.temperature,
        top_k=cfg.top_k or 0,
        top_p=cfg.top_p,
        typical_p=1.0,
        repetition_penalty=cfg.repetition_penalty,
        no_repeat_ngram_size=0,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        renormalize_logits=False,
    )


@contextlib.contextmanager
def _clean_generation_defaults(model: nn.Module, clean: GenerationConfig) -> Iterator[None]:
    """Temporarily replace the model's generation defaults so none of the file's settings leak in."""
    target = getattr(model, "generation_config", None)
    if target is None:
        yield
        return
    model.generation_config = clean
    try:
        yield
    finally:
        model.generation_config = target


class Generated(NamedTuple):
    sequences: torch.Tensor  # [B, P + T'] prompt followed by generated tokens, T' <= max_new_tokens
    scores: tuple[torch.Tensor, ...] | None  # T' tensors [B, V]: processed logits of each step, if asked


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: SamplingConfig,
    eos_token_id: int | list[int],
    pad_token_id: int,
    output_scores: bool = False,
) -> Generated:
    """Sample responses for left-padded prompts [B, P] with exactly the settings in ``cfg``."""
    gen_cfg = generation_config(cfg, eos_token_id, pad_token_id)
    gen_cfg.return_dict_in_generate = True
    gen_cfg.output_scores = output_scores
    # The clean config is both passed and installed as the model default: transformers fills unset
    # fields of a passed config from the model's generation_config.json.
    with _clean_generation_defaults(model, GenerationConfig(eos_token_id=eos_token_id, pad_token_id=pad_token_id)):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg)
    return Generated(out.sequences, out.scores if output_scores else None)


class Truncated(NamedTuple):
    response_ids: torch.Tensor  # [B, T] tokens after the first EOS replaced by pad
    response_mask: torch.Tensor  # [B, T] bool, True up to and including the first EOS
    has_eos: torch.Tensor  # [B] bool


def truncate_at_eos(response_ids: torch.Tensor, eos_token_ids: Sequence[int], pad_token_id: int) -> Truncated:
    """Cut each response at its first EOS (kept, since the policy chose to stop there).

    [B, T] -> ids [B, T], mask [B, T], has_eos [B]. A response without EOS keeps all T tokens.
    """
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for eos in eos_token_ids:
        is_eos |= response_ids == eos
    T = response_ids.shape[1]
    idx = torch.arange(T, device=response_ids.device)
    first = first_true_index(is_eos)  # [B], T where there is no EOS
    mask = idx.unsqueeze(0) <= first.unsqueeze(1)
    ids = torch.where(mask, response_ids, torch.full_like(response_ids, pad_token_id))
    return Truncated(ids, mask, first < T)


def missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtract ``penalty`` from the score of every response that never emitted EOS (TRL semantics)."""
    if penalty is None:
        return scores
    return scores - penalty * (~has_eos).to(scores.dtype)
