"""A lean decoding step for the common decoder architectures: one token per row over a preallocated KV cache.

transformers' forward is general: per layer and per token it builds masks, walks cache objects and calls a dozen
modules, and with peft every adapted projection adds three more. When a step is one token for a few dozen rows,
that bookkeeping costs as much as the arithmetic (SmolLM2-135M with LoRA, 16 rows: 69 ms a step through
transformers, ~45 ms here, 36 ms of which are the matrix products). :class:`LeanDecoder` runs the same arithmetic
with the model's own tensors and nothing else:

- Llama-family models (``llama``, ``mistral`` and ``qwen2`` without a sliding window): RMSNorm, rotary
  embeddings from the model's own ``rotary_emb`` (so every RoPE scaling it knows), grouped-query attention,
  the gated SiLU MLP, biases where the checkpoint has them;
- GPT-2: LayerNorm, learned positions, fused QKV ``Conv1D``, the tanh-GELU MLP.

peft LoRA adapters are merged into a copy of each adapted weight once per rollout (``W + scale * B A``); every
other weight is used in place, so the decoder costs no memory beyond its cache and those copies. The prompt
itself still runs through the model's own forward (once per rollout, where the bookkeeping is cheap), and
:meth:`LeanDecoder.prefill` copies its cache into the preallocated buffers.

The logits agree with transformers' to float32 rounding (~1e-6; tests/test_decoding.py); the sampled tokens'
logprobs go on being checked against the training forward (``rollout/logprob_diff_*``). Any model the decoder
does not know (another architecture, a setting that changes the arithmetic, quantised or other adapter layers,
dropout in training mode, a DDP / FSDP / DeepSpeed wrapper, accelerate's device-map hooks, mixed precision) gets
``None`` from :meth:`LeanDecoder.build`, and the sampler uses the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_LLAMA_TYPES = ("llama", "mistral", "qwen2")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class _Unsupported(Exception):
    """The model has something the lean step does not reproduce; the sampler falls back to its forward."""


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight a linear layer multiplies by (adapters merged in), in the layer's own layout."""
    if type(module) is nn.Linear or type(module).__name__ == "Conv1D":
        return module.weight
    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(module, "get_delta_weight"):
        raise _Unsupported(f"layer type {type(module).__name__}")
    if type(module).__module__ != "peft.tuners.lora.layer" or type(module).__name__ != "Linear":
        raise _Unsupported(f"adapter layer {type(module).__module__}.{type(module).__name__}")
    for adapter in module.active_adapters:
        if module.use_dora.get(adapter, False) or getattr(module, "lora_bias", {}).get(adapter, False):
            raise _Unsupported("DoRA or LoRA bias")
    weight = _weight(base)
    if module.disable_adapters or module.merged:
        return weight
    with torch.no_grad():
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter)
    return weight


def _bias(module: nn.Module) -> torch.Tensor | None:
    base = getattr(module, "base_layer", module)
    return base.bias


def _plain_model(model: nn.Module) -> nn.Module:
    """The transformers model under peft, or raise for wrappers the decoder does not look through."""
    if hasattr(model, "module"):
        raise _Unsupported("a DDP / FSDP / DeepSpeed wrapper")
    if hasattr(model, "get_base_model"):
        if type(model).__module__.split(".")[0] != "peft":
            raise _Unsupported(f"wrapper {type(model).__name__}")
        model = model.get_base_model()
    return model


def _check_dropout(model: nn.Module) -> None:
    """Dropout in training mode (modules, or the functional attention dropout of the config) changes the
    arithmetic the lean step would have to reproduce."""
    if not model.training:
        return
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        raise _Unsupported("dropout in training mode")
    for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
        if getattr(model.config, name, 0.0):
            raise _Unsupported(f"{name} in training mode")


@dataclass
class _Layer:
    norm1: nn.Module
    norm2: nn.Module
    qkv: list[tuple[torch.Tensor, torch.Tensor | None]]  # Llama: q, k, v; GPT-2: the fused c_attn
    out: tuple[torch.Tensor, torch.Tensor | None]
    mlp: list[tuple[torch.Tensor, torch.Tensor | None]]  # Llama: gate, up, down; GPT-2: c_fc, c_proj


class LeanDecoder:
    """One token per row per :meth:`step`, over buffers for ``length`` positions (prompt + response)."""

    def __init__(self, model: nn.Module, kind: str, layers: list[_Layer], batch: int, length: int) -> None:
        self.model, self.kind, self.layers = model, kind, layers
        config = model.config
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        if kind == "llama":
            attn = model.model.layers[0].self_attn
            self.head_dim = attn.head_dim
            self.heads = config.num_attention_heads
            self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
            self.scale = attn.scaling
        else:
            self.heads = config.n_head
            self.head_dim = config.n_embd // config.n_head
            self.kv_heads = self.heads
            self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.batch, self.length = batch, length
        self.keys: list[torch.Tensor] = []  # allocated by prefill, after the prompt forward's own peak
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=self.device)
        self.filled = 0

    @classmethod
    def build(cls, model: nn.Module, batch: int, length: int) -> LeanDecoder | None:
        """A decoder for ``model`` with room for ``batch`` rows of ``length`` positions, or None when the
        model is one the lean step does not reproduce exactly (the sampler then uses the model's forward)."""
        try:
            plain = _plain_model(model)
            _check_dropout(plain)
            first = next(plain.parameters())
            if torch.is_autocast_enabled(first.device.type):
                raise _Unsupported("autocast")
            if first.dtype != torch.float32:
                raise _Unsupported("parameters not in float32")
            if any(hasattr(m, "_hf_hook") for m in plain.modules()) or any(p.is_meta for p in plain.parameters()):
                raise _Unsupported("accelerate's device-map hooks or offloaded (meta) weights")
            kind, layers = _collect(plain)  # last: it merges the LoRA adapters into copies
        except (_Unsupported, AttributeError, StopIteration):
            return None
        return cls(plain, kind, layers, batch, length)

    def prefill(self, cache: Any, attention_mask: torch.Tensor) -> None:
        """Take the prompt's keys and values from transformers' ``cache`` (after the prompt forward) and the
        prompt's ``attention_mask`` [B, P]."""
        P = attention_mask.shape[1]
        shape = (self.batch, self.kv_heads, self.length, self.head_dim)
        for layer in cache.layers[: len(self.layers)]:
            # every position after the prompt is written by its step before any step reads it
            k = torch.empty(shape, dtype=self.dtype, device=self.device)
            v = torch.empty(shape, dtype=self.dtype, device=self.device)
            k[:, :, :P] = layer.keys
            v[:, :, :P] = layer.values
            self.keys.append(k)
            self.values.append(v)
        self.mask[:, 0, 0, :P] = attention_mask.bool()
        self.filled = P

    @torch.no_grad()
    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token [B], position [B, 1] (its position id) -> logits [B, V] for the next token."""
        t = self.filled
        self.mask[:, 0, 0, t] = True
        self.filled = t + 1
        if self.kind == "llama":
            return self._llama_step(token, position, t)
        return self._gpt2_step(token, position, t)

    def _attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: int) -> torch.Tensor:
        """q [B, H, 1, D], k / v [B, KV, 1, D] of position t -> attention output [B, 1, H * D]."""
        keys, values = self.keys[i], self.values[i]
        keys[:, :, t : t + 1] = k
        values[:, :, t : t + 1] = v
        out = F.scaled_dot_product_attention(
            q,
            keys[:, :, : t + 1],
            values[:, :, : t + 1],
            attn_mask=self.mask[..., : t + 1],
            scale=self.scale,
            enable_gqa=self.kv_heads != self.heads,
        )
        return out.transpose(1, 2).reshape(q.shape[0], 1, -1)

    def _llama_step(self, token: torch.Tensor, position: torch.Tensor, t: int) -> torch.Tensor:
        inner = self.model.model
        B, H, KV, D = token.shape[0], self.heads, self.kv_heads, self.head_dim
        x = inner.embed_tokens(token[:, None])  # [B, 1, C]
        cos, sin = inner.rotary_emb(x, position)  # [B, 1, D]
        cos, sin = cos[:, None], sin[:, None]
        half = D // 2
        for i, layer in enumerate(self.layers):
            h = layer.norm1(x)
            (wq, bq), (wk, bk), (wv, bv) = layer.qkv
            # queries and keys rotated together: [B, H + KV, 1, D]
            qk = torch.cat([F.linear(h, wq, bq).view(B, H, 1, D), F.linear(h, wk, bk).view(B, KV, 1, D)], dim=1)
            rotated = torch.cat([-qk[..., half:], qk[..., :half]], dim=-1)
            qk = qk * cos + rotated * sin
            v = F.linear(h, wv, bv).view(B, KV, 1, D)
            attn = self._attend(i, qk[:, :H], qk[:, H:], v, t)
            x = x + F.linear(attn, *layer.out)
            h = layer.norm2(x)
            (wg, bg), (wu, bu), (wd, bd) = layer.mlp
            x = x + F.linear(F.silu(F.linear(h, wg, bg)) * F.linear(h, wu, bu), wd, bd)
        return self.model.lm_head(inner.norm(x))[:, -1]

    def _gpt2_step(self, token: torch.Tensor, position: torch.Tensor, t: int) -> torch.Tensor:
        inner = self.model.transformer
        B, H, D = token.shape[0], self.heads, self.head_dim
        x = inner.wte(token) + inner.wpe(position[:, 0])  # [B, C]
        act = self.gelu
        for i, layer in enumerate(self.layers):
            h = layer.norm1(x)
            (w, b), = layer.qkv
            q, k, v = torch.addmm(b, h, w).view(B, 3, H, 1, D).unbind(1)
            attn = self._attend(i, q, k, v, t)[:, 0]
            w, b = layer.out
            x = x + torch.addmm(b, attn, w)
            h = layer.norm2(x)
            (w1, b1), (w2, b2) = layer.mlp
            x = x + torch.addmm(b2, act(torch.addmm(b1, h, w1)), w2)
        return self.model.lm_head(inner.ln_f(x))

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh" if self.model.config.activation_function in _GELU_TANH else "none")


def _collect(model: nn.Module) -> tuple[str, list[_Layer]]:
    """("llama" | "gpt2", the layers' tensors) for a supported model; raises _Unsupported otherwise."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind in _LLAMA_TYPES:
        return "llama", _llama_layers(model)
    if kind == "gpt2":
        return "gpt2", _gpt2_layers(model)
    raise _Unsupported(f"model_type {kind}")


def _pair(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _weight(module), _bias(module)


def _llama_layers(model: nn.Module) -> list[_Layer]:
    config = model.config
    if getattr(config, "pretraining_tp", 1) != 1 or getattr(config, "hidden_act", "silu") != "silu":
        raise _Unsupported("pretraining_tp or activation")
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        raise _Unsupported("sliding-window attention")
    if type(model).__name__ not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        raise _Unsupported(type(model).__name__)
    layers = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            raise _Unsupported("query/key norms")
        if not type(block.input_layernorm).__name__.endswith("RMSNorm"):
            raise _Unsupported("norm type")
        layers.append(
            _Layer(
                norm1=block.input_layernorm,
                norm2=block.post_attention_layernorm,
                qkv=[_pair(attn.q_proj), _pair(attn.k_proj), _pair(attn.v_proj)],
                out=_pair(attn.o_proj),
                mlp=[_pair(mlp.gate_proj), _pair(mlp.up_proj), _pair(mlp.down_proj)],
            )
        )
    return layers


def _gpt2_layers(model: nn.Module) -> list[_Layer]:
    config = model.config
    if type(model).__name__ != "GPT2LMHeadModel":
        raise _Unsupported(type(model).__name__)
    if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn or config.add_cross_attention:
        raise _Unsupported("GPT-2 attention variant")
    if config.activation_function not in (*_GELU_TANH, "gelu"):
        raise _Unsupported(f"activation {config.activation_function}")
    layers = []
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        layers.append(
            _Layer(
                norm1=block.ln_1,
                norm2=block.ln_2,
                qkv=[_pair(attn.c_attn)],
                out=_pair(attn.c_proj),
                mlp=[_pair(mlp.c_fc), _pair(mlp.c_proj)],
            )
        )
    return layers
