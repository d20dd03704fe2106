"""``tether sample``: generations of a policy on a prompt file, written as JSONL to read, score or normalise on.

The samples are drawn exactly as PPO rollouts are (:func:`tether.sampling.generate` with the KL-safe
settings, responses cut at the first EOS), so they are what the reward will see during RL. Uses:

* reading generations before any RL (the Training FAQ: look at the samples, not only the metrics);
* samples of the *reference* policy on the training prompts, for ``tether rm --normalize_data``
  (mean 0 / std 1 reward normalisation, OpenAI lm-human-preferences) and ``tether check-reward --data``;
* with ``--reward``, each row also carries its score (and each component's score).

Each output row: ``prompt``, ``response``, ``response_tokens``, ``has_eos``, the prompt file's other
columns, and ``score`` / ``score/<component>`` when a reward is given.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tether.checks import (
    AT_LEAST_ONE,
    Range,
    check_device,
    check_model_dir,
    check_output_file,
    check_ranges,
    check_tokenizer_dir,
)
from tether.config import ConfigError, config_help, load_config, take_repeated
from tether.data import check_prompt_lengths, load_prompts, render_prompts
from tether.logging.console import format_samples_table
from tether.models import context_length, disable_dropout, load_causal_lm, load_tokenizer, pick_device
from tether.rewards import build_reward
from tether.rollout import HFGenerator
from tether.sampling import SamplingConfig, check_sampling_config

#: Allowed values of SampleConfig's fields (num_prompts may also be null: all of them).
SAMPLE_RANGES: dict[str, Range] = {
    "num_prompts": AT_LEAST_ONE,
    "samples_per_prompt": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE,
    "max_prompt_length": AT_LEAST_ONE,
    "reward_batch_size": AT_LEAST_ONE,
    "show": Range(0, hint=" (0 prints no table)"),
}


@dataclass
class SampleConfig:
    """What ``tether sample`` generates and where it writes it."""

    output: str = "samples.jsonl"
    """JSONL file to write (replaced atomically; its directory is created)."""
    num_prompts: int | None = None
    """Use the first N prompts of the file; None = all of them."""
    samples_per_prompt: int = 1
    """Responses per prompt."""
    batch_size: int = 16
    """Sequences per generate() call."""
    seed: int = 0
    """Seed of the sampler; the same seed gives the same samples on CPU."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda", ..."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens are an error (naming the row)."""
    reward_batch_size: int = 16
    """Texts per reward-model forward, with --reward."""
    show: int = 8
    """Rows printed as a table at the end (0: none)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        check_ranges(self, SAMPLE_RANGES)


def sample_responses(
    policy: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    batch_size: int,
    chat: bool = False,
) -> list[dict[str, Any]]:
    """One sampled response per prompt, as PPO's rollout draws it: [{response, response_tokens, has_eos}].

    ``chat``: the prompts are chat-template texts (:func:`tether.data.render_prompts`), already carrying the
    template's special tokens.
    """
    generator = HFGenerator(policy, tokenizer, sampling, keep_logprobs=False, add_special_tokens=not chat)
    out: list[dict[str, Any]] = []
    for start in range(0, len(prompts), batch_size):
        gen = generator(prompts[start : start + batch_size])
        texts = tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True)
        for i, text in enumerate(texts):
            out.append(
                {
                    "response": text,
                    "response_tokens": int(gen.response_mask[i].sum()),
                    "has_eos": bool(gen.has_eos[i]),
                }
            )
    return out


def write_jsonl_atomic(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write rows to ``path`` through a temporary file, so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:  # a failed write (a full disk, a directory in the way) leaves no temp file behind
        tmp.unlink(missing_ok=True)
        raise


SAMPLE_HELP = """usage: tether sample --policy DIR --prompts FILE [--output samples.jsonl] [--reward SPEC ...]
                    [--config sample.yaml] [--field value ...]

  --policy DIR       a causal LM directory (save_pretrained format), e.g. a run's final/ or the reference
  --prompts FILE     JSONL/CSV/Parquet with a `prompt` column (other columns are copied to the output rows)
  --reward SPEC      optional: a reward-model directory or FILE.py:FUNCTION (repeat to sum several);
                     each row then carries `score` and `score/<component>`
  --field value      any SampleConfig field below

Sampling is PPO's (pure sampling, EOS allowed, cut at the first EOS), so reference-policy samples written
here are the ones `tether rm --normalize_data` and `tether check-reward --data` expect.

SampleConfig fields:"""


def main(argv: Sequence[str]) -> int:
    """``tether sample``: generate, optionally score, write JSONL and print a few rows."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(SAMPLE_HELP)
        print("\n".join(config_help(SampleConfig)))
        return 0
    rewards, rest = take_repeated(argv, "reward")
    cfg, extra = load_config(SampleConfig, rest, extra=("policy", "prompts", "tokenizer"))
    for name in ("policy", "prompts"):
        if name not in extra:
            raise ConfigError(f"tether sample needs --{name}")
    # Every input is checked before the model loads, so a bad one fails at once with one message.
    check_sampling_config(cfg.sampling)
    check_output_file(cfg.output)
    check_device(cfg.device)
    check_model_dir(extra["policy"], tokenizer="tokenizer" not in extra)
    check_tokenizer_dir(extra.get("tokenizer"))
    tokenizer = load_tokenizer(extra.get("tokenizer"), extra["policy"])
    data = render_prompts(load_prompts(extra["prompts"]), tokenizer)
    context = context_length(extra["policy"])
    check_prompt_lengths(data, tokenizer, cfg.max_prompt_length, context, cfg.sampling.max_new_tokens)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    policy = load_causal_lm(extra["policy"])
    disable_dropout(policy)
    policy.to(device)
    n = len(data) if cfg.num_prompts is None else min(cfg.num_prompts, len(data))
    indices = [i for i in range(n) for _ in range(cfg.samples_per_prompt)]
    prompts, columns = data.select(indices)

    rows = [
        {"prompt": prompts[i], **row, **{k: v[i] for k, v in columns.items()}}
        for i, row in enumerate(
            sample_responses(policy, tokenizer, prompts, cfg.sampling, cfg.batch_size, chat=data.chat)
        )
    ]
    if rewards:
        reward = build_reward(
            rewards if len(rewards) > 1 else rewards[0], device=device, batch_size=cfg.reward_batch_size
        )
        out = reward(prompts, [r["response"] for r in rows], columns)
        for i, row in enumerate(rows):
            row["score"] = float(out.scores[i])
            if len(out.components) > 1:
                row.update({f"score/{name}": float(v[i]) for name, v in out.components.items()})
    path = Path(cfg.output)
    write_jsonl_atomic(rows, path)

    if cfg.show > 0:
        width = shutil.get_terminal_size((120, 24)).columns
        numbers = ("score", "tokens") if rewards else ("tokens",)
        shown = [{**r, "tokens": r["response_tokens"]} for r in rows[: cfg.show]]
        table = format_samples_table(shown, step=0, width=width, max_rows=cfg.show, numbers=numbers)
        table[0] = f"{len(rows)} samples of {extra['policy']}:"
        if len(rows) > cfg.show:
            table.append(f"... {len(rows) - cfg.show} more rows in {path}")
        print("\n".join(table))
    mean_len = sum(r["response_tokens"] for r in rows) / len(rows)
    eos = sum(r["has_eos"] for r in rows) / len(rows)
    summary = (
        f"wrote {len(rows)} samples to {path} (mean length {mean_len:.1f} tokens, {eos:.0%} ended with EOS"
    )
    if rewards:
        summary += f", mean score {sum(r['score'] for r in rows) / len(rows):+.4f}"
    print(summary + ")")
    return 0
