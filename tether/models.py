"""Loading the policy, reference and value models.

The value model is a separate network: a transformer backbone plus a scalar head that starts at
zero (so the first value estimates are 0 and the first advantages are the raw returns).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tether.checks import check_device
from tether.logprobs import position_ids_from_mask


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; any other name must be a device that is here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name)
    return torch.device(name)


#: Config keys that hold a model's number of positions, by family (GPT-2: n_positions; Llama: max_position_...).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(model: Any) -> int | None:
    """The number of positions a causal LM can read (prompt plus response), from a model instance or from
    the config.json of a model directory, without loading the weights; None when the config names none."""
    if isinstance(model, str | Path):
        path = Path(model) / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # not a plain model directory (e.g. a PEFT adapter): loading will tell
        config = config.get("text_config") or config
    else:
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config()
        config = vars(config) if config is not None else {}
    for key in CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0.

    RL needs the logprobs of rollouts, of the old policy and of the first update step to agree: with
    dropout on, the PPO ratio is not 1 at the first step and the KL is noise (TRL does the same).
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def load_causal_lm(policy: str | Path | PreTrainedModel) -> PreTrainedModel:
    if isinstance(policy, nn.Module):  # a transformers model, or a peft model wrapping one
        return policy
    path = Path(policy)
    if not path.exists():
        raise FileNotFoundError(
            f"policy {policy!r} is not a local directory; tether loads models offline from a path "
            "(or pass a PreTrainedModel instance)"
        )
    # float32 weights whatever the checkpoint's dtype (transformers 5 would keep a bf16 checkpoint in bf16):
    # the policy's updates and its AdamW state need float32; mixed_precision runs the forwards in half.
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def load_tokenizer(
    tokenizer: str | Path | PreTrainedTokenizerBase | None, policy_source: Any
) -> PreTrainedTokenizerBase:
    """Load the tokenizer (from the policy's directory when not given) and set it up for rollouts.

    Prompts are left-padded so every response starts at the same column; pad = EOS when the
    tokenizer has no pad token (TRL Training FAQ).
    """
    if tokenizer is None:
        if isinstance(policy_source, str | Path):
            tokenizer = policy_source
        else:
            name = getattr(getattr(policy_source, "config", None), "_name_or_path", "")
            if not name or not Path(name).exists():
                raise ValueError(
                    "pass tokenizer=... when the policy is a model instance without a local path"
                )
            tokenizer = name
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; responses could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a missing one must not break full fine-tuning
        return False
    return isinstance(model, PeftModel)


class AdapterDisabledReference(nn.Module):
    """The reference of a LoRA policy: the same network with its adapters switched off.

    No second copy of the weights is held; the frozen base *is* the reference (as TRL does for peft).
    """

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self._peft = [peft_model]  # a list, so the policy is not registered (and moved, saved) twice

    def forward(self, **kwargs: Any) -> Any:
        model = self._peft[0]
        with model.disable_adapter():
            return model(**kwargs)

    def train(self, mode: bool = True) -> AdapterDisabledReference:  # noqa: ARG002 - always eval
        return super().train(False)


def lora_is_trained(peft_model: nn.Module) -> bool:
    """Whether a peft model carries LoRA adapters that already change its function (some ``B`` matrix is non-zero).

    A fresh LoRA adapter (``B = 0``) leaves the base model's function unchanged, so the base *is* the policy's
    starting point; an adapter loaded from an earlier training run is not. Other adapter types are treated as
    fresh (their initial state cannot be read off the weights).
    """
    return any(p.detach().any() for name, p in peft_model.named_parameters() if "lora_B" in name)


def frozen_copy(model: PreTrainedModel) -> nn.Module:
    """The reference model: the policy as it starts, frozen and in eval mode.

    For a peft model with fresh adapters, the same network with its adapters switched off (no second copy of
    the weights). For one that starts from an already-trained adapter, the reference must be that adapter's
    starting state, not the bare base model (TRL's PPO compared against the base): a frozen copy with the
    adapter merged in.
    """
    if is_peft_model(model):
        if not lora_is_trained(model):
            return AdapterDisabledReference(model)
        ref = copy.deepcopy(model).merge_and_unload()
    else:
        ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def mergeable_copy(model: nn.Module) -> PreTrainedModel:
    """A plain transformers model with any LoRA adapters merged in (what ``final/`` holds)."""
    if is_peft_model(model):
        return copy.deepcopy(model).merge_and_unload()
    return model


def backbone_of(model: PreTrainedModel) -> nn.Module:
    """The transformer body of a CausalLM or SequenceClassification model (no LM/score head)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(f"cannot find the backbone of {type(model).__name__}")
    return base


class ValueModel(nn.Module):
    """Transformer backbone + zero-initialised scalar head: values for every position, [B, L]."""

    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> ValueModel:
        if is_peft_model(model):  # the value network starts from the base weights, without the adapters
            model = mergeable_copy(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        if hidden is None:
            raise ValueError(f"cannot read the hidden size of {type(model).__name__}")
        backbone = copy.deepcopy(backbone_of(model))
        backbone.requires_grad_(True)  # a LoRA policy's base is frozen; the value network trains in full
        return cls(backbone, int(hidden))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        hidden = out.last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()  # [B, L]


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    return a.get_vocab() == b.get_vocab()
