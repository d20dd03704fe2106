"""A toy task that learns on a CPU in seconds: a tiny GPT-2 and a character tokenizer built in-process.

The reward is the fraction of response characters drawn from a target set (default: the vowels).
A random-initialised model samples nearly uniformly over ~30 characters, so the reward starts near
``len(target) / vocab`` and its optimum, 1.0, is known; the KL penalty keeps the policy from collapsing
onto the target characters.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

TOY_ALPHABET = string.ascii_lowercase + " .,!"
EOS = "<eos>"
UNK = "<unk>"


def make_toy_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character of ``TOY_ALPHABET``, plus EOS and UNK."""
    vocab = {UNK: 0, EOS: 1}
    for ch in TOY_ALPHABET:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token=UNK, pad_token=EOS)
    fast.padding_side = "left"
    return fast


def make_toy_model(
    tokenizer: PreTrainedTokenizerFast, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, seed: int = 0
) -> GPT2LMHeadModel:
    """A randomly initialised tiny GPT-2 over the toy tokenizer's vocabulary (~100k parameters)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def make_toy_prompts(n: int = 256, seed: int = 0) -> list[str]:
    """Random lowercase 'words' of 3-8 characters."""
    rng = random.Random(seed)
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8))) for _ in range(n)]


class CharFractionReward:
    """Reward = fraction of the response's characters that are in ``target`` (0 for an empty response)."""

    def __init__(self, target: str = "aeiou") -> None:
        self.target = set(target)
        self.name = "char_fraction"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **columns: Any) -> list[float]:
        return [sum(c in self.target for c in r) / len(r) if r else 0.0 for r in responses]
