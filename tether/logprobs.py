"""Log-probabilities and entropies of response tokens.

Shapes: B batch, P prompt length (left-padded), T response length (right-padded), L = P + T, V vocab.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from tether.sampling import SamplingConfig, kl_biasing_settings, warp_logits

# Rows of [*, V] processed at once: bounds the float32 temporaries to _ROWS_PER_BLOCK x V.
_ROWS_PER_BLOCK = 256


def _row_blocks(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """[..., V] -> blocks of at most _ROWS_PER_BLOCK rows [n, V], in row-major order, as views where possible.

    Response logits are a strided slice of the model's output; ``reshape(-1, V)`` would copy the whole
    [B, T, V] tensor, so a 3-D input is walked sequence by sequence instead.
    """
    if x.dim() == 1:
        yield x.unsqueeze(0)
        return
    seqs = x.unsqueeze(0) if x.dim() == 2 else x.reshape(-1, *x.shape[-2:])
    for seq in seqs:
        yield from seq.split(_ROWS_PER_BLOCK)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``index``, in float32.

    logits [..., V], index [...] -> [...]. Computed as ``logit[index] - logsumexp(logits)`` a block of
    rows at a time so the full [..., V] log-softmax is never materialised (as TRL's helper does).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
    lse = torch.cat([torch.logsumexp(block, dim=-1) for block in _row_blocks(logits)])
    return picked - lse.view(picked.shape)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dim: [..., V] -> [...], float32.

    Entries at -inf (masked vocabulary) contribute 0, not NaN.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    out = []
    for block in _row_blocks(logits):  # blockwise for the same memory reason as above
        logp = torch.log_softmax(block, dim=-1)
        p = logp.exp()
        out.append(-torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1))
    return torch.cat(out).view(logits.shape[:-1])


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token of each row, whatever the left padding.

    [B, L] -> [B, L]. Padding positions get 0 (they are masked out anyway). Without this, a
    left-padded prompt is seen at shifted positions and its logprobs differ from the unpadded ones.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ResponseForward(NamedTuple):
    """Result of one forward over prompt + response."""

    logprobs: torch.Tensor  # [B, T] float32 logprob of each response token
    logits: torch.Tensor  # [B, T, V] logits that predicted each response token (not temperature-scaled)


def align_with_response(per_position: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """The entries of a per-position output [B, L, ...] that belong to each response token: [B, T, ...].

    The output at position ``i - 1`` has seen the tokens up to ``i - 1`` only: its logits predict token ``i``
    and its value is that of the state before token ``i``. The response tokens sit at ``[P, L)``, so their
    entries are ``[P - 1, L - 1)``. Every trainer aligns logits and values with this one function.
    """
    return per_position[:, prompt_length - 1 : -1]


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes transformers' ``logits_to_keep`` (the LM head on the last N positions
    only), looking through the wrappers tether meets: DDP / FSDP / DeepSpeed (``.module``) and peft."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def response_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int
) -> torch.Tensor:
    """Logits predicting each response token: [B, L] -> [B, T, V] (see :func:`align_with_response`).

    Where the model allows it, the LM head runs on the T + 1 last positions only (the prompt's last position
    predicts the first response token), not on the prompt: on a 135M-parameter model with a 49k vocabulary the
    head is a fifth of the forward's work, and prompts are often as long as the responses.
    """
    kept = accepts_logits_to_keep(model)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **({"logits_to_keep": input_ids.shape[1] - prompt_length + 1} if kept else {}),
    )
    # with the head on positions [P - 1, L) only, the response's logits are all but the last
    return out.logits[:, :-1] if kept else align_with_response(out.logits, prompt_length)


class PolicyForward(NamedTuple):
    """The policy's view of B response tokens after one forward."""

    logprobs: torch.Tensor  # [B, T] under the distribution sampled from (the PPO ratio's logprobs)
    model_logprobs: torch.Tensor  # [B, T] under the policy's own distribution at the temperature (for KL)
    logits: torch.Tensor  # [B, T, V] raw logits predicting each response token


def policy_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    sampling: SamplingConfig,
    eos_token_ids: Sequence[int],
) -> PolicyForward:
    """Policy logprobs of the response tokens, under the sampled distribution and the model's own.

    Both are at the sampling temperature. They differ only when ``sampling.allow_biased`` warps the sampling
    distribution (top-k, top-p, min_new_tokens): then the ratio of a policy loss uses the warped one, so the
    ratio is that of the distribution that really generated the tokens, while the KL uses the model's own.
    input_ids, attention_mask [B, L] (prompt left-padded to P, response right-padded).
    """
    logits = response_logits(model, input_ids, attention_mask, prompt_length)  # [B, T, V]
    response_ids = input_ids[:, prompt_length:]
    model_lp = selective_log_softmax(logits, response_ids, sampling.temperature)
    if sampling.allow_biased and kl_biasing_settings(sampling):
        warped = warp_logits(logits, sampling, eos_token_ids)
        lp = selective_log_softmax(warped, response_ids, 1.0)
    else:
        lp = model_lp
    return PolicyForward(lp, model_lp, logits)


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    temperature: float = 1.0,
) -> ResponseForward:
    """Logprobs of the response tokens of ``input_ids`` under ``model`` at the sampling temperature.

    input_ids, attention_mask: [B, L] with prompts left-padded to length P and responses right-padded.
    The logits are divided by ``temperature`` (the distribution the tokens were sampled from), for the
    policy and the reference alike; see DESIGN.md, "RL details that must be right".
    """
    logits = response_logits(model, input_ids, attention_mask, prompt_length)  # [B, T, V]
    response_ids = input_ids[:, prompt_length:]
    return ResponseForward(selective_log_softmax(logits, response_ids, temperature), logits)
