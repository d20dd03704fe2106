"""Text-quality metrics and KL attribution to token types, from a rollout's response tokens.

Reward hacking (the TRL training FAQ's reason for the KL penalty) shows in the text before it shows in the
reward or the KL: the policy repeats the few tokens the reward pays for ("love", "joy", "!"), so the batch
gets less diverse and the KL concentrates on those tokens. These functions measure both, cheaply, from the
token ids every step already has: no decoding, no extra forward pass.

Shapes: B responses, T response length. ``response_ids`` is a [B, T] integer tensor, ``response_mask`` a [B, T]
bool tensor (True means the token counts; padding is False). An n-gram never crosses a response boundary or
a masked position (it is taken over each response's real tokens, in order). A statistic with nothing to count
(every response shorter than n, an empty batch) is 0.0, never NaN, so it cannot trip the non-finite check.

Metric names (:func:`quality_metrics`, :func:`kl_token_metrics`):

- ``quality/distinct_1``, ``quality/distinct_2``: unique n-grams / all n-grams over the whole batch
  (Li et al. 2016, "A diversity-promoting objective"); lower is more repetitive.
- ``quality/repeat_3gram``: per response, the share of its 3-grams that repeat an earlier 3-gram of the same
  response; the mean over responses with at least one 3-gram. 0 is no loop, near 1 is a loop.
- ``quality/top5_token_share``: the share of the batch's tokens taken by its 5 most frequent token types.
- ``kl/top5_token_share``: the share of the step's KL carried by the 5 token types with the largest summed KL.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

#: The quality metrics every step logs, in the order the report shows them.
QUALITY_KEYS: tuple[str, ...] = (
    "quality/distinct_1",
    "quality/distinct_2",
    "quality/repeat_3gram",
    "quality/top5_token_share",
)
#: Steps 1..N of a run are the default baseline of the quality metrics (report and health check).
BASELINE_STEPS = 3
#: Token types per step in the KL attribution table (``kl_tokens.jsonl``).
KL_TABLE_ROWS = 10


def response_tokens(response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[list[int]]:
    """Each response's real tokens, in order: [B, T] ids and [B, T] mask -> B lists of token ids."""
    ids = response_ids.tolist()
    keep = response_mask.bool().tolist()
    return [
        [t for t, k in zip(row, row_keep, strict=True) if k] for row, row_keep in zip(ids, keep, strict=True)
    ]


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(responses: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n of a batch: unique n-grams / all n-grams, over every response's n-grams together.

    ``responses``: B token-id lists (:func:`response_tokens`). 0.0 when no response has n tokens.
    """
    grams = [g for tokens in responses for g in _ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(responses: Sequence[Sequence[int]], n: int = 3) -> float:
    """Mean over responses of (n-grams - unique n-grams) / n-grams within the response: the share of a
    response's n-grams that repeat an earlier one of the same response. Responses shorter than n are left
    out; 0.0 when none is long enough."""
    shares = []
    for tokens in responses:
        grams = _ngrams(tokens, n)
        if grams:
            shares.append((len(grams) - len(set(grams))) / len(grams))
    return sum(shares) / len(shares) if shares else 0.0


def top_k_token_share(responses: Sequence[Sequence[int]], k: int = 5) -> float:
    """The share of the batch's tokens taken by its ``k`` most frequent token types; 0.0 with no tokens."""
    counts = Counter(t for tokens in responses for t in tokens)
    total = sum(counts.values())
    return sum(c for _, c in counts.most_common(k)) / total if total else 0.0


def quality_metrics(response_ids: torch.Tensor, response_mask: torch.Tensor) -> dict[str, float]:
    """The ``quality/*`` metrics of a batch: [B, T] ids and [B, T] mask (see the module docstring)."""
    return quality_of(response_tokens(response_ids, response_mask))


def quality_of(responses: Sequence[Sequence[int]]) -> dict[str, float]:
    """The ``quality/*`` metrics of B token-id lists (:func:`response_tokens`)."""
    return {
        "quality/distinct_1": distinct_n(responses, 1),
        "quality/distinct_2": distinct_n(responses, 2),
        "quality/repeat_3gram": repeated_ngram_share(responses, 3),
        "quality/top5_token_share": top_k_token_share(responses, 5),
    }


def texts_quality(texts: Sequence[str], tokenizer: Any) -> dict[str, float]:
    """The ``quality/*`` metrics of text responses (e.g. the reference model's samples, as a baseline),
    tokenized without special tokens by the policy's ``tokenizer``."""
    return quality_of([tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts])


# -- KL attribution ------------------------------------------------------------------------------------------


class TokenKL(NamedTuple):
    """The step's per-token KL summed by token type, largest sum first. Each field is [K], K token types.

    ``kl`` sums back to the step's summed KL (``(kl * mask).sum()``); ``share`` is ``kl`` over that sum, so the
    shares of all K types sum to 1 (all 0 when the step's KL sums to 0). With the k1 estimator single tokens
    can carry negative KL, so a type's share can be negative and another's above its part of the positive KL.
    """

    token_ids: torch.Tensor  # [K] long
    kl: torch.Tensor  # [K] float64, summed KL of each type
    share: torch.Tensor  # [K] float64
    count: torch.Tensor  # [K] long, occurrences of each type


def kl_by_token(kl: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor) -> TokenKL:
    """Group the per-token KL [B, T] of the real tokens by response token id [B, T] (mask [B, T]).

    Summed in float64, so the sums add back to the total to float64 rounding.
    """
    mask = response_mask.bool()
    ids = response_ids[mask]  # [N] the real tokens, flattened
    values = kl[mask].double()  # [N]
    types, inverse = torch.unique(ids, return_inverse=True)
    sums = torch.zeros(len(types), dtype=torch.float64, device=values.device).index_add_(0, inverse, values)
    counts = torch.bincount(inverse, minlength=len(types))
    total = values.sum()
    share = sums / total if bool(total != 0) else torch.zeros_like(sums)
    order = torch.argsort(sums, descending=True, stable=True)
    return TokenKL(types[order], sums[order], share[order], counts[order])


def top_kl_share(attribution: TokenKL, k: int = 5) -> float:
    """The share of the step's positive KL carried by the ``k`` token types with the largest summed KL.

    Over the types whose summed KL is positive (each type clamped at 0), so it stays in [0, 1] even when the
    k1 estimator makes some types' sums negative; 0.0 when no type has positive KL (step 1, policy = reference).
    """
    positive = attribution.kl.clamp(min=0.0)
    total = float(positive.sum())
    return float(positive[:k].sum()) / total if total > 0 else 0.0


def kl_token_metrics(
    kl: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, float]:
    """``kl/top5_token_share`` of a step: per-token KL [B, T], ids [B, T], mask [B, T]."""
    return {"kl/top5_token_share": top_kl_share(kl_by_token(kl, response_ids, response_mask), 5)}


def kl_table_rows(
    attribution: TokenKL, decode: Callable[[int], str], n: int = KL_TABLE_ROWS
) -> list[dict[str, Any]]:
    """The first ``n`` rows of the attribution as a table: token text, token id, summed KL, share, count."""
    return [
        {
            "rank": rank + 1,
            "token": decode(int(token)),
            "token_id": int(token),
            "kl": float(kl),
            "share": float(share),
            "count": int(count),
        }
        for rank, (token, kl, share, count) in enumerate(
            zip(
                attribution.token_ids[:n],
                attribution.kl[:n],
                attribution.share[:n],
                attribution.count[:n],
                strict=True,
            )
        )
    ]


def high_kl_tokens(
    kl: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor, k: int = 3
) -> list[list[tuple[int, int, float]]]:
    """Per response, its ``k`` real tokens with the highest per-token KL, highest first, as (position, token
    id, KL). [B, T] KL, ids and mask -> B lists of at most ``k`` triples (fewer for a shorter response)."""
    out: list[list[tuple[int, int, float]]] = []
    masked = kl.double().masked_fill(~response_mask.bool(), -math.inf)  # [B, T]
    for row in range(masked.shape[0]):
        n_real = int(response_mask[row].sum())
        values, positions = torch.topk(masked[row], min(k, n_real))
        out.append(
            [(int(p), int(response_ids[row, p]), float(v)) for v, p in zip(values, positions, strict=True)]
        )
    return out


def format_high_kl(tokens: Sequence[tuple[int, int, float]], decode: Callable[[int], str]) -> str:
    """One response's high-KL tokens as text for a sample table: ``"love" 0.81; "!" 0.52``."""
    return "; ".join(f"{json.dumps(decode(token), ensure_ascii=False)} {kl:.3g}" for _, token, kl in tokens)


# -- baseline ------------------------------------------------------------------------------------------------


def baseline_of(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], steps: int = BASELINE_STEPS
) -> dict[str, float]:
    """The mean of each of ``keys`` over the rows with ``1 <= step <= steps`` that have a finite value.

    ``rows``: a metrics stream (``metrics.jsonl`` rows with their ``"step"``). A key with no such value is left
    out.
    """
    out: dict[str, float] = {}
    for key in keys:
        values = [
            float(row[key])
            for row in rows
            if isinstance(row.get("step"), int)
            and 1 <= row["step"] <= steps
            and isinstance(row.get(key), (int, float))
            and math.isfinite(row[key])
        ]
        if values:
            out[key] = sum(values) / len(values)
    return out
