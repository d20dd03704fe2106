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
from typing import Literal, NamedTuple

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
    """1.0 disables it. Other values reshape the distribution and are refused (even with allow_biased)."""
    min_length: int = 0
    """transformers' min_length (prompt included). Any value > 0 suppresses EOS and is refused even with
    allow_biased: use min_new_tokens, which tether reproduces exactly."""
    do_sample: bool = True
    """False (greedy decoding) is refused: greedy tokens are not samples of the policy, so no KL estimate holds."""
    num_beams: int = 1
    """Beam search (> 1) is refused for the same reason."""
    engine: Literal["tether", "hf"] = "tether"
    """The sampling loop: "tether" (a lean loop over the model's KV cache that keeps only each sampled token's
    logprob and draws tokens by inverting the CDF: the same distribution as transformers' generate, not the same
    draws for a seed) or "hf" (transformers' generate, which stacks a [B, T, V] tensor of scores to read them)."""
    allow_biased: bool = False
    """Opt in to top_k / top_p / min_new_tokens. The PPO ratio then uses the logprobs of the distribution
    actually sampled from (the same warps applied in the training forward), and the KL penalty must use an
    estimator that cannot go negative (kl.estimator = "k3" or "full")."""

    def __post_init__(self) -> None:
        from tether.checks import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Range, check_ranges

        # Ranges only; the KL-safety of the values is check_sampling_config's. A temperature of inf would sample
        # uniformly with KL 0, so every float must be finite too.
        ranges = {
            "max_new_tokens": AT_LEAST_ONE,
            "temperature": POSITIVE,
            "top_k": NON_NEGATIVE,
            "top_p": Range(0, 1, low_open=True),
            "min_new_tokens": NON_NEGATIVE,
            "repetition_penalty": POSITIVE,
            "min_length": NON_NEGATIVE,
            "num_beams": AT_LEAST_ONE,
        }
        check_ranges(self, ranges, prefix="sampling")


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
    """Refuse settings that bias the KL estimate, with the reason (unless ``allow_biased``)."""
    bad = kl_biasing_settings(cfg)
    if not cfg.do_sample or cfg.num_beams != 1:
        raise KLBiasError(
            f"refusing do_sample={cfg.do_sample}, num_beams={cfg.num_beams}: greedy decoding and beam search do "
            "not sample from the policy, so the PPO ratio and every KL estimate are wrong for their tokens and "
            "the KL can go negative (TRL Training FAQ). RL rollouts need do_sample=true, num_beams=1."
        )
    if cfg.min_length:
        raise KLBiasError(
            f"refusing min_length={cfg.min_length}: it suppresses EOS, so the sampled tokens do not come from the "
            "policy and the KL estimate can go negative (TRL Training FAQ). If a minimum is needed, use "
            "min_new_tokens with sampling.allow_biased=true, which tether handles exactly."
        )
    if cfg.allow_biased:
        if cfg.repetition_penalty != 1.0:
            raise KLBiasError(
                f"repetition_penalty={cfg.repetition_penalty} is refused even with allow_biased: it depends on "
                "every earlier token, and tether does not reproduce it exactly in the training forward"
            )
        return
    if bad:
        raise KLBiasError(
            f"refusing sampling settings {', '.join(bad)}: they sample tokens from a distribution other than "
            "the policy's own, so the per-token KL estimate log p_policy - log p_ref is biased and can go "
            "negative; because the reward is score - kl_coef * KL, the policy is then paid for driving the "
            "KL negative instead of learning the reward (TRL Training FAQ, 'negative KL'). Use pure sampling: "
            "top_k=0, top_p=1.0, min_new_tokens=0, repetition_penalty=1.0, or set sampling.allow_biased=true "
            "with kl.estimator 'k3' or 'full' to have tether handle top-k/top-p/min_new_tokens exactly."
        )


def biased_sampling_warning(cfg: SamplingConfig) -> str | None:
    """The start-of-run warning for ``allow_biased`` runs that really use a biasing setting."""
    bad = kl_biasing_settings(cfg)
    if not cfg.allow_biased or not bad:
        return None
    return (
        f"warning: sampling with {', '.join(bad)} (sampling.allow_biased=true). Responses are not drawn from "
        "the policy's own distribution, so the usual per-token KL estimate log p_policy - log p_ref can go "
        "negative and would pay the policy for exploiting it (TRL Training FAQ, 'negative KL'). tether "
        "computes the PPO ratio under the same warped distribution that generated the tokens and requires a KL "
        "estimator that is >= 0 for every sample (k3 or full); watch objective/kl and kl/negative_fraction, and "
        "prefer pure sampling (top_k=0, top_p=1.0, min_new_tokens=0) unless the task needs these settings."
    )


def warp_logits(
    logits: torch.Tensor, cfg: SamplingConfig, eos_token_ids: Sequence[int], offset: int = 0
) -> torch.Tensor:
    """Apply the sampling warps of ``cfg`` to response logits, exactly as ``generate`` does.

    logits [B, T, V] (position t predicts response token ``offset + t``) -> float32 [B, T, V] whose log-softmax is
    the distribution tokens were sampled from. Same order and tie rules as transformers' processors:
    min_new_tokens (EOS -> -inf while t < min_new_tokens), temperature, top-k, top-p (keeping >= 1 token).
    """
    out = logits.float()
    if cfg.min_new_tokens:
        early = torch.arange(offset, offset + out.shape[1], device=out.device) < cfg.min_new_tokens  # [T]
        eos = torch.zeros(out.shape[-1], dtype=torch.bool, device=out.device)
        eos[list(eos_token_ids)] = True
        out = out.masked_fill(early[None, :, None] & eos[None, None, :], float("-inf"))
    if cfg.temperature != 1.0:
        out = out / cfg.temperature
    if cfg.top_k:
        k = min(cfg.top_k, out.shape[-1])
        kth = torch.topk(out, k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(out, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - cfg.top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        out = out.masked_fill(remove, float("-inf"))
    return out


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
    synced: bool = False,
) -> Generated:
    """Sample responses for left-padded prompts [B, P] with exactly the settings in ``cfg``.

    ``synced``: go on running forwards until every process has finished (a sharded model needs every process
    in every forward); the extra tokens of a finished process are padding.
    """
    gen_cfg = generation_config(cfg, eos_token_id, pad_token_id)
    gen_cfg.return_dict_in_generate = True
    gen_cfg.output_scores = output_scores
    # The clean config is both passed and installed as the model default: transformers fills unset
    # fields of a passed config from the model's generation_config.json.
    with _clean_generation_defaults(model, GenerationConfig(eos_token_id=eos_token_id, pad_token_id=pad_token_id)):
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg, synced_gpus=synced
        )
    return Generated(out.sequences, out.scores if output_scores else None)


def sample(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: SamplingConfig,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    keep_logprobs: bool = True,
    synced: bool = False,
    lean_step: bool = True,
) -> Sampled:
    """Sample responses for left-padded prompts [B, P]: tokens [B, T'] and, if kept, per-token statistics.

    The loop ``generate`` runs for these settings, without its per-step machinery: one prompt forward that fills
    the KV cache, then one token per step, warped as :func:`warp_logits` warps and drawn from the same
    ``softmax`` by :func:`draw_tokens` (the same distribution as generate's ``multinomial``, ~10x cheaper; the
    draws for a seed differ). With ``keep_logprobs`` each step keeps
    three numbers per row (never a [B, T, V] stack): the sampled token's logprob under the warped distribution
    and under the model's own at the temperature, and that distribution's entropy - what a training forward
    over the same tokens would compute (see :func:`tether.logprobs.policy_logprobs`). A row that has emitted EOS
    gets padding; the loop stops when every row has (every row of every process when ``synced``) or after
    ``max_new_tokens``. Each token after the first runs through :class:`tether.decoding.LeanDecoder` when it
    knows the model (``lean_step=False`` forces the model's own forward), else through the model's forward.
    """
    from transformers import DynamicCache

    from tether.decoding import LeanDecoder
    from tether.logprobs import accepts_logits_to_keep

    B = input_ids.shape[0]
    device = input_ids.device
    # the per-token forward: tether's lean step where it reproduces the model exactly, else the model's own
    lean = LeanDecoder.build(model, B, input_ids.shape[1] + cfg.max_new_tokens) if lean_step and not synced else None
    eos = torch.tensor(list(eos_token_ids), device=device)
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate computes them for left padding
    cache = DynamicCache()
    # the LM head on the last prompt position only (as generate does), not a [B, P, V] tensor of logits
    last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    logits = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        **last_only,
    ).logits[:, -1]
    position = positions[:, -1:]
    if lean is not None:
        lean.prefill(cache, mask)
        cache = None  # the prompt's keys and values now live in the decoder's buffers
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    kept: dict[str, list[torch.Tensor]] = {"logprobs": [], "model_logprobs": [], "entropy": []}
    warped = bool(kl_biasing_settings(cfg))
    for t in range(cfg.max_new_tokens):
        scores = warp_logits(logits[:, None], cfg, eos_token_ids, offset=t)[:, 0]  # [B, V] float32
        # unwarped, the scores are the model's own distribution: one log-softmax serves the draw and the stats
        own_logp = scores.log_softmax(-1) if keep_logprobs and not warped else None
        probs = own_logp.exp() if own_logp is not None else scores.softmax(-1)
        token = draw_tokens(probs)
        token = token.masked_fill(done, pad_token_id)
        tokens.append(token)
        if keep_logprobs:
            _keep_step(kept, logits, scores, token, cfg.temperature, warped, own_logp, probs)
        done |= torch.isin(token, eos)
        if t + 1 == cfg.max_new_tokens or _all_done(done, synced):
            break
        position = position + 1
        if lean is not None:
            logits = lean.step(token, position)
            continue
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        logits = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True
        ).logits[:, -1]
    stacked = {name: torch.stack(v, dim=1) if keep_logprobs else None for name, v in kept.items()}
    return Sampled(torch.stack(tokens, dim=1), **stacked)


def draw_tokens(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of ``probs`` [B, V] (non-negative, not necessarily normalised), drawn from the
    categorical distribution it is proportional to: [B] long.

    Inverts each row's cumulative distribution at one uniform number: index ``i`` is drawn when
    ``u * total`` falls in ``[cdf[i-1], cdf[i])``, an interval of length ``probs[i]``, so a zero-probability
    index is never drawn. The sums run in float64, so every index keeps its float32 probability to ~1e-16
    (a float32 running sum would shift the low-probability tail by up to ~1e-7 each). The same distribution as
    ``torch.multinomial(probs, 1)``, whose CPU kernel draws an exponential number per vocabulary entry (18 ms for
    16 rows of a 49,152-token vocabulary on two cores, against ~1 ms here).
    """
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)  # [B, V]
    total = cdf[:, -1:]
    if not (torch.isfinite(total) & (total > 0)).all():
        raise ValueError(
            "sampling: the next-token probabilities of some row are NaN, inf or all zero; the model's logits are "
            "not finite (a diverged or corrupted model), or every token was masked"
        )
    u = torch.rand(total.shape, dtype=torch.float64, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total even after rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


class Sampled(NamedTuple):
    """What :func:`sample` returns; the per-token statistics are None unless ``keep_logprobs``."""

    tokens: torch.Tensor  # [B, T'] sampled ids, pad after a row's EOS
    logprobs: torch.Tensor | None  # [B, T'] under the distribution sampled from (warped, at the temperature)
    model_logprobs: torch.Tensor | None  # [B, T'] under the model's own distribution at the temperature
    entropy: torch.Tensor | None  # [B, T'] entropy of the model's own distribution at the temperature


def _keep_step(
    kept: dict[str, list[torch.Tensor]],
    logits: torch.Tensor,
    scores: torch.Tensor,
    token: torch.Tensor,
    temperature: float,
    warped: bool,
    own_logp: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
) -> None:
    """One step's statistics of the sampled ``token`` [B]: from the raw ``logits`` [B, V] and the warped
    ``scores`` [B, V] it was drawn from, the same float32 operations as the training forward's. ``own_logp``
    and its ``exp``, ``probs``, are the model's own log-softmax at the temperature when the caller has it."""
    if own_logp is None:
        own = logits.float()
        if temperature != 1.0:
            own = own / temperature
        own_logp = own.log_softmax(-1)
        probs = None
    model_lp = own_logp.gather(-1, token[:, None]).squeeze(1)
    kept["model_logprobs"].append(model_lp)
    kept["logprobs"].append(scores.log_softmax(-1).gather(-1, token[:, None]).squeeze(1) if warped else model_lp)
    p = own_logp.exp() if probs is None else probs
    kept["entropy"].append(-torch.where(p > 0, p * own_logp, torch.zeros_like(p)).sum(-1))


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    """Whether every row has finished; with ``synced``, every row of every process (a sharded model needs
    every process in every forward)."""
    if not synced:
        return bool(done.all())
    import torch.distributed as dist

    unfinished = (~done).any().to(torch.float32).reshape(1)
    if dist.get_backend() == "nccl" and unfinished.device.type != "cuda":
        unfinished = unfinished.cuda()
    dist.all_reduce(unfinished)
    return bool(unfinished.item() == 0)


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
