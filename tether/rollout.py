"""Rollouts: sample responses (a :class:`Generator`), then the no-grad forwards every algorithm needs.

Shapes: B batch, P prompt length (prompts left-padded), T response length (responses right-padded), L = P + T,
V vocabulary. Masks are boolean, True where the token counts.

A :class:`Generator` turns prompt strings into a :class:`Generation`: token ids cut at the first EOS and,
when asked, the logprob each token was sampled with. :class:`HFGenerator` is the Hugging Face ``generate``
implementation with the KL-safe settings of :mod:`tether.sampling`; ``tether sample``, the demos and every
trainer sample through it. :func:`build_rollout` then runs the policy, and optionally the reference and a
value model, over the sampled tokens (dropout off, no gradients) and returns a :class:`tether.types.Rollout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from tether.kl import EXACT_KL, KLTerms, kl_needs_logits, token_kl
from tether.logprobs import (
    align_with_response,
    entropy_from_logits,
    policy_logprobs,
    response_logits,
    selective_log_softmax,
)
from tether.sampling import (
    SamplingConfig,
    check_sampling_config,
    generate,
    kl_biasing_settings,
    sample,
    truncate_at_eos,
)
from tether.sharding import is_sharded
from tether.types import Rollout


class Generation(NamedTuple):
    """B sampled responses to B prompts."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    response_ids: torch.Tensor  # [B, T] cut at the first EOS (kept), pad after it; T = the longest response
    response_mask: torch.Tensor  # [B, T] bool, True up to and including the first EOS
    has_eos: torch.Tensor  # [B] bool
    logprobs: torch.Tensor | None  # [B, T] logprob each token was sampled with (0 outside the mask), if kept
    # [B, T] the model's own logprob of each token at the temperature, and the entropy of that distribution
    # (0 outside the mask), when the sampler kept them: what a training forward would compute
    model_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    @property
    def prompt_length(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        """[B, L] prompt followed by response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, L] 1 on real prompt tokens and on response tokens up to the EOS."""
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)


class Generator(Protocol):
    """Samples one response per prompt from the current policy."""

    @property
    def eos_token_ids(self) -> list[int]:
        """The token ids that end a response."""
        ...

    def __call__(self, prompts: Sequence[str]) -> Generation:
        """[B] prompt strings -> their [B] responses."""
        ...


def eos_ids_of(tokenizer: Any) -> list[int]:
    """The tokenizer's EOS id(s) as a list."""
    eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


class HFGenerator:
    """:class:`Generator` on Hugging Face ``generate`` with exactly the settings of ``sampling``.

    Args:
        model: the policy (a transformers causal LM, or a peft model wrapping one); set to eval mode to sample.
        tokenizer: its tokenizer, left-padding.
        sampling: the sampling settings (refused when they would bias the KL, see :mod:`tether.sampling`).
        keep_logprobs: also return the logprob each token was sampled with (from ``generate``'s processed
            scores); it costs a [B, T, V] stack, so ``tether sample`` leaves it off.
        add_special_tokens: False for prompts already rendered with a chat template (they carry its tokens).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        sampling: SamplingConfig,
        *,
        keep_logprobs: bool = True,
        add_special_tokens: bool = True,
    ) -> None:
        check_sampling_config(sampling)
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.keep_logprobs = keep_logprobs
        self.add_special_tokens = add_special_tokens
        self._eos = eos_ids_of(tokenizer)

    @property
    def eos_token_ids(self) -> list[int]:
        return self._eos

    # no_grad, not inference_mode, here and in build_rollout: FSDP reuses the buffers its forwards gather when
    # it trains, and an inference-mode tensor cannot be written to outside inference mode.
    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Generation:
        device = next(self.model.parameters()).device
        enc = self.tokenizer(
            list(prompts), padding=True, return_tensors="pt", add_special_tokens=self.add_special_tokens
        ).to(device)
        prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
        P = prompt_ids.shape[1]
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        synced = is_sharded(self.model)
        logprobs = model_logprobs = entropy = None
        if self.sampling.engine == "tether":
            sampled, logprobs, model_logprobs, entropy = sample(
                self.model, prompt_ids, prompt_mask, self.sampling, self._eos, pad, self.keep_logprobs, synced
            )
        else:
            gen = generate(
                self.model, prompt_ids, prompt_mask, self.sampling, self._eos, pad, self.keep_logprobs, synced
            )
            sampled = gen.sequences[:, P:]
            if gen.scores is not None:
                # generate()'s scores are the processed (warped, temperature-scaled) logits it sampled from.
                scores = torch.stack(gen.scores, dim=1)  # [B, T, V]
                logprobs = selective_log_softmax(scores, sampled, 1.0)
        cut = truncate_at_eos(sampled, self._eos, pad)
        T = max(int(cut.response_mask.sum(-1).max().item()), 1)  # drop columns that are padding everywhere
        response_ids, response_mask = cut.response_ids[:, :T], cut.response_mask[:, :T]

        def per_token(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[:, :T].masked_fill(~response_mask, 0.0)

        return Generation(
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            cut.has_eos,
            per_token(logprobs),
            per_token(model_logprobs),
            per_token(entropy),
        )


@torch.no_grad()
def build_rollout(
    generation: Generation,
    policy: nn.Module,
    sampling: SamplingConfig,
    eos_token_ids: Sequence[int],
    *,
    ref_policy: nn.Module | None = None,
    value_model: nn.Module | None = None,
    kl_estimator: str = "k1",
    log_exact_kl: bool = False,
    chunk_size: int = 16,
    policy_forward: bool = True,
) -> Rollout:
    """The no-grad forwards over sampled tokens, ``chunk_size`` sequences at a time, as a :class:`Rollout`.

    The policy's old logprobs (under the sampled and the model's own distribution) and entropy come from a
    policy forward, or, with ``policy_forward=False``, from the sampler, which computed the same numbers from the
    same logits as it sampled (see :func:`rollout_needs_policy_forward`); then ``gen_logprobs`` is None, since
    there is nothing to compare them with. With ``ref_policy`` the reference logprobs and the per-token KL of
    ``kl_estimator`` (and the exact KL when ``log_exact_kl``); with ``value_model`` the value of the state
    before each response token. Models are put in eval mode (dropout off).
    """
    if not policy_forward and (
        generation.model_logprobs is None or generation.entropy is None or generation.logprobs is None
    ):
        raise ValueError("policy_forward=False needs a generation that kept its logprobs and entropy")
    if not policy_forward and (log_exact_kl or kl_needs_logits(kl_estimator)):
        raise ValueError("the exact KL needs the policy's logits: build_rollout needs policy_forward=True")
    input_ids, attention_mask = generation.input_ids, generation.attention_mask  # [B, L]
    mask = generation.response_mask
    P = generation.prompt_length
    policy.eval()
    if value_model is not None:
        value_model.eval()
    parts: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        parts.setdefault(name, []).append(value)

    for s in range(0, input_ids.shape[0], chunk_size):
        rows = slice(s, s + chunk_size)
        ids, att = input_ids[rows], attention_mask[rows]
        if policy_forward:
            fwd = policy_logprobs(policy, ids, att, P, sampling, eos_token_ids)
            model_lp, logits = fwd.model_logprobs, fwd.logits
            keep("logprobs", fwd.logprobs)
            keep("model_logprobs", model_lp)
            keep("entropy", entropy_from_logits(logits, sampling.temperature))
            del fwd
        else:
            model_lp, logits = generation.model_logprobs[rows], None  # type: ignore[index]
        if ref_policy is not None:
            ref_logits = response_logits(ref_policy, ids, att, P)
            ref_lp = selective_log_softmax(ref_logits, ids[:, P:], sampling.temperature)
            terms = KLTerms(model_lp, ref_lp, logits, ref_logits, sampling.temperature)
            kl = token_kl(kl_estimator, terms)
            keep("ref_logprobs", ref_lp)
            keep("kl", kl)
            if log_exact_kl:
                keep("exact_kl", kl if kl_estimator == EXACT_KL else token_kl(EXACT_KL, terms))
            del ref_logits, terms
        logits = None  # free this chunk's [c, T, V] before the next forward
        if value_model is not None:
            keep(
                "values", align_with_response(value_model(ids, att), P)
            )  # value of the state before each token

    def cat(name: str, masked: bool = False) -> torch.Tensor | None:
        if name not in parts:
            return None
        out = torch.cat(parts[name])
        # clone(): tensors made under inference_mode cannot be saved for backward in the update.
        return (out.masked_fill(~mask, 0.0) if masked else out).clone()

    gen_lp = generation.logprobs
    if not policy_forward:  # the sampler's numbers are the old logprobs; no second source to compare
        # the ratio's distribution, chosen as policy_logprobs chooses it
        warped = sampling.allow_biased and kl_biasing_settings(sampling)
        ratio_lp = generation.logprobs if warped else generation.model_logprobs
        parts["logprobs"] = [ratio_lp]  # type: ignore[list-item]
        parts["model_logprobs"] = [generation.model_logprobs]  # type: ignore[list-item]
        parts["entropy"] = [generation.entropy]  # type: ignore[list-item]
        gen_lp = None
    return Rollout(
        input_ids=input_ids.clone(),
        attention_mask=attention_mask.clone(),
        response_mask=mask.clone(),
        prompt_length=P,
        logprobs=cat("logprobs"),
        model_logprobs=cat("model_logprobs"),
        entropy=cat("entropy"),
        has_eos=generation.has_eos.clone(),
        ref_logprobs=cat("ref_logprobs"),
        kl=cat("kl", masked=True),
        values=cat("values"),
        gen_logprobs=gen_lp.clone() if gen_lp is not None else None,
        exact_kl=cat("exact_kl", masked=True),
    )


def pad_rollout(ro: Rollout, prompt_length: int, response_length: int, pad_token_id: int) -> Rollout:
    """``ro`` with its prompts left-padded to ``prompt_length`` and its responses right-padded to ``response_length``.

    Padding is masked out (attention 0, response mask False, per-token values 0) and position ids are computed
    from the attention mask, so the logprobs of the real tokens do not depend on it. Used to stack the rollouts of
    several processes, whose longest prompt and response differ.
    """
    P, T = ro.prompt_length, ro.response_mask.shape[1]
    left, right = prompt_length - P, response_length - T
    if left < 0 or right < 0:
        raise ValueError(f"cannot pad a rollout of P={P}, T={T} to P={prompt_length}, T={response_length}")
    if left == 0 and right == 0:
        return ro
    B = ro.input_ids.shape[0]

    def ids(fill: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.full((B, left), fill, dtype=dtype), torch.full((B, right), fill, dtype=dtype))

    pl, pr = ids(pad_token_id, ro.input_ids.dtype)
    input_ids = torch.cat([pl, ro.input_ids, pr], dim=1)
    ml, mr = ids(0, ro.attention_mask.dtype)
    attention_mask = torch.cat([ml, ro.attention_mask, mr], dim=1)

    def per_token(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.cat([x, torch.zeros(B, right, dtype=x.dtype)], dim=1)

    return Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=torch.cat([ro.response_mask, torch.zeros(B, right, dtype=torch.bool)], dim=1),
        prompt_length=prompt_length,
        logprobs=per_token(ro.logprobs),  # type: ignore[arg-type]
        model_logprobs=per_token(ro.model_logprobs),  # type: ignore[arg-type]
        entropy=per_token(ro.entropy),  # type: ignore[arg-type]
        has_eos=ro.has_eos,
        ref_logprobs=per_token(ro.ref_logprobs),
        kl=per_token(ro.kl),
        values=per_token(ro.values),
        gen_logprobs=per_token(ro.gen_logprobs),
        exact_kl=per_token(ro.exact_kl),
    )


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Stack rollouts (one per process, in rank order) into one, padding them to a common P and T."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.prompt_length for r in parts)
    T = max(r.response_mask.shape[1] for r in parts)
    padded = [pad_rollout(r, P, T, pad_token_id) for r in parts]
    fields: dict[str, Any] = {"prompt_length": P}
    for name in Rollout.__dataclass_fields__:
        if name == "prompt_length":
            continue
        values = [getattr(r, name) for r in padded]
        fields[name] = None if values[0] is None else torch.cat(values)
    return Rollout(**fields)
