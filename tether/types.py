"""Typed containers passed between the steps of a training loop.

Shape letters: B batch (rollout batch), P prompt length (prompts left-padded), T response length
(responses right-padded), L = P + T, V vocabulary.

Masks are boolean and True means "this token counts" (DESIGN.md). ``response_mask`` is True on the
response tokens up to and including the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class Rollout:
    """What every algorithm knows about one rollout batch. All tensors are plain (not inference) tensors.

    The parts that only some algorithms have are optional: ``ref_logprobs`` and ``kl`` exist when there is a
    reference model (a KL coefficient > 0), ``values`` when there is a value model (PPO), ``exact_kl`` when
    ``kl.log_exact`` asks for it, ``gen_logprobs`` when the generator kept the logprobs it sampled with.
    """

    input_ids: torch.Tensor  # [B, L] prompt (left-padded) + response (right-padded, pad after EOS)
    attention_mask: torch.Tensor  # [B, L] 1 on real prompt tokens and on response tokens up to EOS
    response_mask: torch.Tensor  # [B, T] bool
    prompt_length: int  # P
    logprobs: torch.Tensor  # [B, T] old logprobs: the policy's, under the distribution sampled from, float32
    model_logprobs: torch.Tensor  # [B, T] the policy's own distribution at the temperature (for KL); same as
    #                               logprobs unless sampling.allow_biased warps the sampling distribution
    entropy: torch.Tensor  # [B, T] entropy of the policy's next-token distribution, float32
    has_eos: torch.Tensor  # [B] bool
    ref_logprobs: torch.Tensor | None = None  # [B, T] reference logprobs at the temperature, float32
    kl: torch.Tensor | None = None  # [B, T] per-token KL estimate (kl.estimator), 0 outside the response mask
    values: torch.Tensor | None = None  # [B, T] value of the state before each response token, float32
    gen_logprobs: torch.Tensor | None = None  # [B, T] logprobs the generator itself sampled with
    exact_kl: torch.Tensor | None = None  # [B, T] exact per-token KL, when kl.log_exact asks for it

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]

    def lengths(self) -> torch.Tensor:
        """[B] tokens each row really has (prompt without its left padding, response up to its EOS)."""
        return self.attention_mask.sum(-1)

    def trimmed(self) -> Rollout:
        """The same rows without the columns that are padding in every row: prompt columns left of the longest
        prompt, response columns right of the longest response. Position ids come from the attention mask and
        padding is masked out of attention, so the real tokens' logprobs and values do not change."""
        P = self.prompt_length
        left = P - int(self.attention_mask[:, :P].sum(-1).max())
        T = max(int(self.response_mask.sum(-1).max()), 1)
        if left == 0 and T == self.response_mask.shape[1]:
            return self
        kwargs: dict[str, object] = {"prompt_length": P - left}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("input_ids", "attention_mask"):
                kwargs[f.name] = value[:, left : P + T]
            elif isinstance(value, torch.Tensor) and value.dim() == 2:  # per response token
                kwargs[f.name] = value[:, :T]
            elif f.name != "prompt_length":
                kwargs[f.name] = value
        return Rollout(**kwargs)  # type: ignore[arg-type]

    def to(self, device: torch.device | str) -> Rollout:
        """Every tensor moved to ``device``."""
        return Rollout(**{f.name: _moved(getattr(self, f.name), device) for f in fields(self)})

    def index(self, idx: torch.Tensor) -> Rollout:
        """Rows ``idx`` of every batched tensor."""
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kwargs[f.name] = value[idx] if isinstance(value, torch.Tensor) else value
        return Rollout(**kwargs)


def _moved(value: object, device: torch.device | str) -> object:
    return value.to(device) if isinstance(value, torch.Tensor) else value
