"""The lean decoding step against the model's own forward: same tokens, same logprobs, and a fallback for
every model it does not reproduce."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tether.decoding import LeanDecoder
from tether.sampling import SamplingConfig, sample
from tether.toy import make_toy_model, make_toy_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_toy_tokenizer()


def _llama_like(cls, config_cls, tokenizer, **extra):
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=128,
        **extra,
    )
    return cls(config)


def _model(name: str, tokenizer):
    if name == "gpt2":
        return make_toy_model(tokenizer)
    if name == "llama":
        return _llama_like(LlamaForCausalLM, LlamaConfig, tokenizer)
    if name == "llama-rope-scaled":
        return _llama_like(LlamaForCausalLM, LlamaConfig, tokenizer, rope_scaling={"rope_type": "linear", "factor": 2.0})
    if name == "qwen2":  # biases on q, k, v
        return _llama_like(Qwen2ForCausalLM, Qwen2Config, tokenizer)
    raise AssertionError(name)


def _with_lora(model, name: str):
    from peft import LoraConfig, get_peft_model

    targets = ["c_attn", "mlp.c_fc"] if name == "gpt2" else ["q_proj", "v_proj", "up_proj"]
    torch.manual_seed(1)
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():  # B starts at 0: make the adapters change the model
        for pname, p in wrapped.named_parameters():
            if "lora_B" in pname:
                p.normal_(std=0.3)
    return wrapped


def _sample_both(model, tokenizer, cfg: SamplingConfig):
    enc = tokenizer(["abc", "hello there", "xy", "a"] * 4, return_tensors="pt", padding=True)  # left padding
    enc = enc.to(next(model.parameters()).device)
    eos, pad = tokenizer.eos_token_id, tokenizer.unk_token_id
    out = []
    for lean in (True, False):
        torch.manual_seed(5)
        with torch.no_grad():
            out.append(sample(model, enc.input_ids, enc.attention_mask, cfg, [eos], pad, lean_step=lean))
    return out


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "llama-rope-scaled", "qwen2"])
def test_the_lean_step_samples_the_tokens_and_logprobs_of_the_models_own_forward(
    tokenizer, name, lora, device
) -> None:
    model = _model(name, tokenizer)
    if lora:
        model = _with_lora(model, name)
    model.eval().to(device)
    assert LeanDecoder.build(model, 2, 8) is not None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        cfg = SamplingConfig(max_new_tokens=16, temperature=0.8)
        lean, own = _sample_both(model, tokenizer, cfg)
    finally:
        hook.remove()
    T = own.tokens.shape[1]
    assert len(calls) == 1 + T  # the lean run calls the model for the prompt only, the other once per token
    assert torch.equal(lean.tokens, own.tokens)
    assert lean.logprobs is not None and own.logprobs is not None
    for got, want in ((lean.logprobs, own.logprobs), (lean.model_logprobs, own.model_logprobs)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(lean.entropy, own.entropy, rtol=0, atol=1e-5)
    for k, v in model.state_dict().items():  # adapters merged into copies, never into the model
        assert torch.equal(v, before[k]), k


def test_the_lean_step_follows_disabled_adapters(tokenizer) -> None:
    """With peft's adapters disabled the lean step is the base model's (as the reference is sampled)."""
    base = _model("llama", tokenizer).eval()
    plain = {k: v.clone() for k, v in base.state_dict().items()}
    lora = _with_lora(base, "llama").eval()
    reference = _model("llama", tokenizer).eval()
    reference.load_state_dict(plain)
    with lora.disable_adapter():
        lean, _ = _sample_both(lora, tokenizer, SamplingConfig(max_new_tokens=12))
    want, _ = _sample_both(reference, tokenizer, SamplingConfig(max_new_tokens=12))
    assert torch.equal(lean.tokens, want.tokens)
    torch.testing.assert_close(lean.logprobs, want.logprobs, rtol=0, atol=1e-5)


def test_models_the_lean_step_does_not_reproduce_fall_back_to_their_forward(tokenizer) -> None:
    from peft import LoraConfig, get_peft_model

    def gpt2(**extra):
        torch.manual_seed(0)
        return GPT2LMHeadModel(
            GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4, **extra)
        )

    assert LeanDecoder.build(gpt2().eval(), 2, 8) is not None
    assert LeanDecoder.build(gpt2(scale_attn_by_inverse_layer_idx=True).eval(), 2, 8) is None
    assert LeanDecoder.build(gpt2(reorder_and_upcast_attn=True).eval(), 2, 8) is None
    assert LeanDecoder.build(gpt2(activation_function="relu").eval(), 2, 8) is None
    assert LeanDecoder.build(gpt2().train(), 2, 8) is None  # dropout 0.1 in training mode
    assert LeanDecoder.build(gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train(), 2, 8) is not None
    assert LeanDecoder.build(gpt2().eval().to(torch.bfloat16), 2, 8) is None

    class Wrapped(torch.nn.Module):  # DDP / FSDP / DeepSpeed
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert LeanDecoder.build(Wrapped(gpt2().eval()), 2, 8) is None
    hooked = gpt2().eval()
    hooked.transformer.h[0]._hf_hook = object()  # what accelerate's device_map dispatch attaches
    assert LeanDecoder.build(hooked, 2, 8) is None
    dora = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"], use_dora=True)).eval()
    assert LeanDecoder.build(dora, 2, 8) is None
    windowed = _llama_like(
        __import__("transformers").MistralForCausalLM, __import__("transformers").MistralConfig, tokenizer
    )
    assert LeanDecoder.build(windowed.eval(), 2, 8) is None  # sliding-window attention

    # a fallback model still samples, through its own forward
    model = gpt2(scale_attn_by_inverse_layer_idx=True).eval()
    lean, own = _sample_both(model, tokenizer, SamplingConfig(max_new_tokens=6))
    assert torch.equal(lean.tokens, own.tokens) and torch.equal(lean.logprobs, own.logprobs)
