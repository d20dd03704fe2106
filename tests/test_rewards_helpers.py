"""Tiny in-process tokenizers and reward models shared by the reward tests (no hub downloads, no tests here)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

WORDS = ["good", "bad", "the", "cat", "dog", "sat", "on", "mat", "a", "b", "c", "x", "y", "z", "q", "w"]


def gpt_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """Word-level decoder-style tokenizer whose pad token IS the eos token (the common decoder setup)."""
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()  # joins word tokens with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )


def bert_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """A second, different tokenizer: other ids (reversed word order) and [CLS] ... [SEP] around every text."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + list(reversed(words)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def gpt2_config(vocab_size: int, **overrides: object) -> GPT2Config:
    kwargs = dict(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=vocab_size,
        n_positions=64,
        num_labels=1,
        bos_token_id=1,
        eos_token_id=1,
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def tiny_gpt2_rm(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides: object
) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    config = gpt2_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, **overrides)
    model = GPT2ForSequenceClassification(config).eval()
    # HF initialises the score head with std 0.02: scale it up so that score differences are far above noise.
    with torch.no_grad():
        model.score.weight.mul_(50.0)
    return model


def tiny_gpt2_lm(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt2_config(len(tokenizer))).eval()


def tiny_bert_rm(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, num_labels: int = 1
) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
    )
    return BertForSequenceClassification(config).eval()
