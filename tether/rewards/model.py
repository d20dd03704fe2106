"""Reward models: loading, tokenising, and the one score-at-the-last-valid-token function.

Training (``tether.trainers.reward``) and scoring (:class:`tether.rewards.Reward`) both call
:func:`sequence_scores`, so the token a reward model is trained on is the token it is read at.

Why not ``model(...).logits``: Hugging Face's decoder sequence-classification heads (GPT-2, Llama, Qwen ...)
pool at the rightmost token whose id is not ``pad_token_id``. When the pad token is the EOS token (the usual
choice for decoder models) and a text ends with EOS, that rule skips the EOS and reads the token before it —
and with left padding it reads a pad. We instead run the backbone, right-pad, and read the hidden state at
``attention_mask.sum(-1) - 1``, which does not depend on token ids at all.

Truncation policy: with ``max_length=None`` a text longer than the model's context is an error naming the row
(silently scoring a cut text would reward something the policy did not write). With ``max_length`` set, long
texts are cut *from the left* to ``min(max_length, context)`` tokens, keeping the end of the response, where
the score is read; special tokens such as BERT's ``[CLS]`` are kept.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tether.rewards.base import RewardError

GAIN_KEY = "tether_reward_gain"
BIAS_KEY = "tether_reward_bias"
# Tokenizers without a real limit report this sentinel (1e30) as model_max_length.
_NO_LIMIT = 10**9


def model_name(model: PreTrainedModel) -> str:
    """A short human name for a model: the last part of the path it was loaded from, else its class name."""
    path = getattr(model.config, "name_or_path", "") or ""
    return os.path.basename(os.path.normpath(path)) if path else type(model).__name__


def context_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> int | None:
    """The longest input the model accepts, from its config (and the tokenizer's limit when it is real)."""
    limits = [getattr(model.config, key, None) for key in ("max_position_embeddings", "n_positions", "n_ctx")]
    if tokenizer is not None:
        limits.append(getattr(tokenizer, "model_max_length", None))
    real = [int(x) for x in limits if isinstance(x, int) and 0 < x < _NO_LIMIT]
    return min(real) if real else None


def token_limit(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int | None
) -> int | None:
    """``min(max_length, context)``: the length texts are cut to (``max_length``) or checked against (None)."""
    context = context_length(model, tokenizer)
    if max_length is None:
        return context
    if max_length < 1:
        raise RewardError(f"max_length must be positive, got {max_length}")
    return max_length if context is None else min(max_length, context)


@contextlib.contextmanager
def _left_truncation(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    # ``truncation_side`` is a tokenizer attribute, not a call argument (a keyword is silently ignored).
    previous = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        yield
    finally:
        tokenizer.truncation_side = previous


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    limit: int | None,
    truncate: bool,
    where: str,
) -> list[list[int]]:
    """Tokenise ``texts`` (with the tokenizer's special tokens) into [B] lists of ids of length <= ``limit``.

    ``where`` names the source in errors (a model, or a file and column). With ``truncate=False`` a text longer
    than ``limit`` raises :class:`RewardError` naming its row; with ``truncate=True`` it is cut from the left.
    """
    ids: list[list[int]] = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    if limit is None:
        return ids
    too_long = [i for i, row in enumerate(ids) if len(row) > limit]
    if not too_long:
        return ids
    if not truncate:
        i = too_long[0]
        raise RewardError(
            f"{where}: text at row {i} has {len(ids[i])} tokens, more than the model's context of {limit} "
            f"({len(too_long)} such rows); set max_length to truncate texts from the left"
        )
    with _left_truncation(tokenizer):
        cut = tokenizer(
            [texts[i] for i in too_long], add_special_tokens=True, truncation=True, max_length=limit
        )
    for i, row in zip(too_long, cut["input_ids"], strict=True):
        ids[i] = row
    return ids


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [B] id lists into ``(input_ids [B, T], attention_mask [B, T] bool)``; True means a real token."""
    if not sequences or min(len(s) for s in sequences) == 0:
        raise RewardError("cannot score an empty token sequence (the tokenizer produced no tokens)")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        attention_mask[row, : len(seq)] = True
    return input_ids, attention_mask


def last_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] right-padded mask -> [B] index of each row's last real token (``mask.sum(-1) - 1``).

    Raises ``ValueError`` for a left-padded or holed mask or an empty row, where the formula would be wrong.
    """
    mask = attention_mask.bool()
    lengths = mask.sum(-1)  # [B]
    positions = torch.arange(mask.shape[-1], device=mask.device)
    if bool((lengths == 0).any()) or not torch.equal(mask, positions < lengths[:, None]):
        raise ValueError("attention_mask must be right-padded with at least one real token per row")
    return lengths - 1


def uses_last_token_pooling(model: PreTrainedModel) -> bool:
    """True for decoder reward models (a ``score`` head on a backbone, pooled at the last token).

    Encoder models (BERT-like, a ``classifier`` on a pooled [CLS] state) pool at a fixed position, so their own
    forward is already right and is used as is.
    """
    head = getattr(model, "score", None)
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return isinstance(head, nn.Module) and isinstance(backbone, nn.Module)


def sequence_scores(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Raw reward-head output of each right-padded sequence: [B, T] ids and mask -> [B] float32.

    Decoder models: backbone hidden state at the last valid token (see module docstring), then the ``score``
    head. Encoder models: the model's own pooled logits. No gain/bias is applied here (training needs raw
    scores); gradients flow, so the caller chooses ``torch.inference_mode()`` or not.
    """
    if uses_last_token_pooling(model):
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask.long()
        ).last_hidden_state  # [B,T,H]
        last = last_valid_index(attention_mask).to(hidden.device)  # [B]
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
        logits = model.score(pooled)  # [B, 1]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask.long()).logits  # [B, 1]
    if logits.shape[-1] != 1:
        raise RewardError(f"reward model {model_name(model)!r} has {logits.shape[-1]} outputs, expected 1")
    return logits[:, 0].float()


def reward_gain_bias(model: PreTrainedModel) -> tuple[float, float]:
    """The normalisation stored in the model's config by ``normalize_reward_model`` (1, 0 when absent)."""
    return float(getattr(model.config, GAIN_KEY, 1.0)), float(getattr(model.config, BIAS_KEY, 0.0))


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """A pad id for right padding; its value never matters because pooling reads the attention mask."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def score_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    apply_normalization: bool = True,
) -> torch.Tensor:
    """Score [B] full texts with a reward model -> [B] float32 on CPU: ``gain * raw + bias``.

    Texts are re-tokenised with the reward model's own tokenizer (so the policy's tokenizer may differ), run in
    micro-batches of ``batch_size`` sorted by length (less padding; the result does not depend on padding), in
    eval mode under ``torch.no_grad()`` (not inference mode, which a model sharded with FSDP cannot run under). See
    the module docstring for the truncation policy.
    """
    if batch_size < 1:
        raise RewardError(f"batch_size must be positive, got {batch_size}")
    name = model_name(model)
    limit = token_limit(model, tokenizer, max_length)
    ids = encode_texts(
        tokenizer, texts, limit=limit, truncate=max_length is not None, where=f"reward model {name!r}"
    )
    if not ids:
        return torch.zeros(0, dtype=torch.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    scores = torch.empty(len(ids), dtype=torch.float32)
    was_training = model.training
    model.eval()  # dropout off while scoring
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                input_ids, mask = pad_right([ids[i] for i in rows], pad_id_of(tokenizer))
                raw = sequence_scores(model, input_ids.to(device), mask.to(device))
                scores[rows] = raw.cpu()
    finally:
        model.train(was_training)
    if apply_normalization:
        gain, bias = reward_gain_bias(model)
        scores = gain * scores + bias
    return scores


def check_one_label(model: PreTrainedModel, name: str | None = None) -> None:
    """Raise :class:`RewardError` naming the model unless it has exactly one output label."""
    num_labels = getattr(model.config, "num_labels", None)
    if num_labels != 1:
        raise RewardError(
            f"reward model {name or model_name(model)!r} has num_labels={num_labels}; a reward model must have "
            "exactly one output (train one with `tether rm`)"
        )


def _is_seq_cls(architectures: Sequence[str] | None) -> bool:
    return any(arch.endswith("ForSequenceClassification") for arch in architectures or ())


def load_reward_model(
    path: str, *, device: torch.device | str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a saved one-label sequence-classification model and its tokenizer from a directory.

    Refuses a causal LM or a checkpoint without a trained score head: loading one through
    ``AutoModelForSequenceClassification`` would silently attach a random head and give a random reward.
    """
    if not os.path.isdir(path):
        raise RewardError(f"reward model directory {path!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise RewardError(f"reward model {path!r}: cannot read config.json ({err})") from err
    if config.num_labels != 1:
        raise RewardError(
            f"reward model {path!r} has num_labels={config.num_labels}; a reward model must have exactly one "
            "output (train one with `tether rm`)"
        )
    if not _is_seq_cls(config.architectures):
        raise RewardError(
            f"reward model {path!r} is a {config.architectures} checkpoint, not a sequence-classification model; "
            "its score head would be random (train a reward model with `tether rm`)"
        )
    model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    if info["missing_keys"]:
        raise RewardError(
            f"reward model {path!r}: weights missing from the checkpoint: {sorted(info['missing_keys'])}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise RewardError(f"reward model {path!r}: no tokenizer saved next to the model ({err})") from err
    return model.to(device).eval(), tokenizer


def as_trainable_reward_model(model: str | PreTrainedModel) -> PreTrainedModel:
    """A one-label sequence-classification model to train, from a path or instance of one, or of a causal LM.

    A causal LM keeps its backbone weights and gets a new one-output score head (``AutoModelFor
    SequenceClassification`` built from the same config), as in OpenAI's lm-human-preferences reward model.
    """
    if isinstance(model, str):
        if not os.path.isdir(model):
            raise RewardError(f"model {model!r} is not a local directory (tether loads models offline)")
        config = AutoConfig.from_pretrained(model)
        if _is_seq_cls(config.architectures):
            loaded = AutoModelForSequenceClassification.from_pretrained(model)
            check_one_label(loaded, model)
            return loaded
        return AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    if type(model).__name__.endswith("ForSequenceClassification"):
        check_one_label(model)
        return model
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_labels = 1
    config.architectures = None
    seq_cls = AutoModelForSequenceClassification.from_config(config)
    source = getattr(model, model.base_model_prefix, None)
    target = getattr(seq_cls, seq_cls.base_model_prefix, None)
    if source is None or target is None:
        raise RewardError(f"cannot turn {type(model).__name__} into a reward model: no backbone found")
    target.load_state_dict(source.state_dict())
    return seq_cls.to(next(model.parameters()).device)
