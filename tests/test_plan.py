"""``tether plan``: the memory estimate against hand-derived numbers and against measured peak memory.

The hand-derived numbers use one small Llama config: V = 100, h = 16, i = 32, 2 layers, 4 heads of 4, 2 kv heads.
Its parameters: embedding V h = 1600; per layer q and o 16 x 16 = 256 each, k and v 16 x 8 = 128 each, the MLP
3 x 16 x 32 = 1536, two norms 32: 2336; the final norm 16; an untied LM head 1600. Total 1600 + 2 x 2336 + 16 +
1600 = 7888. PPO's value model is the backbone and a 1-output head: 7888 - 1600 + 16 + 1 = 6305.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import tether.plan as plan_mod
from tether.cli import main as cli_main
from tether.config import ConfigError, from_dict
from tether.plan import (
    activation_bytes,
    check_memory_at_start,
    estimate_memory,
    format_plan,
    model_shape,
)
from tether.trainers.grpo import GRPOConfig
from tether.trainers.ppo import PPOConfig

WORKER = Path(__file__).with_name("plan_worker.py")
PARAMS, VALUE_PARAMS = 7888, 6305


def small_config(**overrides: object) -> LlamaConfig:
    kwargs = dict(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4
    )
    kwargs.update(
        num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=1, pad_token_id=1
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def item(plan: plan_mod.MemoryPlan, prefix: str, phase: str = "held") -> int:
    (found,) = [it.bytes for it in plan.items if it.what.startswith(prefix) and it.phase == phase]
    return found


def test_parameters_are_counted_exactly_from_the_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    for name, tied in (("untied", False), ("tied", True)):
        model = AutoModelForCausalLM.from_config(small_config(tie_word_embeddings=tied))
        model.config.save_pretrained(tmp_path / name)  # only config.json: the plan never loads weights
        shape = model_shape(tmp_path / name)
        assert shape.params == sum(p.numel() for p in model.parameters()) == PARAMS - 1600 * tied
        assert shape.layer_params == 2336 and shape.param_bytes == 4
        assert model_shape(model) == shape  # an instance gives the same
    bf16 = small_config()
    bf16.dtype = torch.bfloat16
    assert model_shape(bf16).param_bytes == 4  # a policy is loaded in float32 whatever its checkpoint's dtype
    assert model_shape(bf16, causal=False).param_bytes == 2  # a reward model keeps its checkpoint's dtype


def test_held_memory_is_weights_gradients_and_adamw_state() -> None:
    cfg = PPOConfig(total_episodes=8, rollout_batch_size=8, mini_batch_size=4, micro_batch_size=2)
    plan = estimate_memory(cfg, "ppo", small_config())
    assert item(plan, "policy weights") == PARAMS * 4
    assert item(plan, "policy gradients") == PARAMS * 4
    assert item(plan, "policy AdamW state") == 2 * PARAMS * 4
    assert item(plan, "value model weights") == VALUE_PARAMS * 4
    assert item(plan, "value model AdamW state") == 2 * VALUE_PARAMS * 4
    assert item(plan, "reference weights") == PARAMS * 4
    # GRPO without a KL penalty loads no reference and no value model
    grpo = GRPOConfig(total_episodes=8, rollout_batch_size=2, mini_batch_size=4, micro_batch_size=2)
    no_kl = dataclasses.replace(grpo, kl=dataclasses.replace(grpo.kl, coef=0.0))
    names = [it.what for it in estimate_memory(no_kl, "grpo", small_config()).items]
    assert not any(n.startswith(("reference", "value")) for n in names)


def test_fsdp_divides_the_trained_models_and_the_reference_only_when_asked() -> None:
    cfg = PPOConfig(
        total_episodes=8, rollout_batch_size=8, mini_batch_size=4, micro_batch_size=1, sharding="fsdp"
    )
    plan = estimate_memory(cfg, "ppo", small_config(), world_size=4)
    assert item(plan, "policy weights") == PARAMS * 4 // 4
    assert item(plan, "value model AdamW state") == 2 * VALUE_PARAMS * 4 // 4
    assert item(plan, "reference weights") == PARAMS * 4
    sharded = estimate_memory(
        dataclasses.replace(cfg, shard_frozen_models=True), "ppo", small_config(), world_size=4
    )
    assert item(sharded, "reference weights") == PARAMS * 4 // 4
    # before sharding, every model is whole on the device
    assert item(plan, "every model whole", "load") == (2 * PARAMS + VALUE_PARAMS) * 4


def test_lora_trains_only_the_adapters_and_its_reference_costs_nothing() -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_config(small_config()), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    adapters = 2 * (2 * (16 + 16) + 2 * (16 + 8))  # per layer: q r (in + out) + v r (in + out); 2 layers
    cfg = PPOConfig(total_episodes=8, rollout_batch_size=8, mini_batch_size=4, micro_batch_size=2)
    plan = estimate_memory(cfg, "ppo", model)
    assert item(plan, "policy weights") == (PARAMS + adapters) * 4
    assert item(plan, "policy gradients") == adapters * 4
    assert item(plan, "policy AdamW state") == 2 * adapters * 4
    assert item(plan, "reference") == 0
    # the value model is a copy of the base (adapters merged away), trained in full
    assert item(plan, "value model weights") == item(plan, "value model gradients") == VALUE_PARAMS * 4


def test_activation_kv_cache_and_logits_formulas() -> None:
    shape = model_shape(small_config())
    # per layer and token: (10 h + 4 i) floats, a float per head, two rsqrt, a mask row of 5: 4 (160 + 128) + 16 + 8
    # + 20 = 1196 bytes; 2 layers, 10 tokens; the final norm 12 h + 8 = 200 bytes a token
    assert activation_bytes(shape, 10, 5, 4, False, False) == 2 * 10 * 1196 + 10 * 200
    # checkpointed: only each layer's float32 input (4 h bytes a token)
    assert activation_bytes(shape, 10, 5, 4, False, True) == 2 * 10 * 64 + 10 * 200
    cfg = GRPOConfig(total_episodes=8, rollout_batch_size=8, num_generations=4, mini_batch_size=16,
                     micro_batch_size=4, max_prompt_length=20, sampling=dataclasses.replace(GRPOConfig().sampling, max_new_tokens=12))  # fmt: skip
    plan = estimate_memory(cfg, "grpo", shape, world_size=2)
    B, L, T, m, V = 8 // 2 * 4, 32, 12, 4, 100  # each of 2 processes samples 4 prompts x 4 completions
    # k and v of 2 layers (and one layer's copy while the cache grows), 2 kv heads of 4
    assert item(plan, "KV cache", "generation") == 2 * (2 + 1) * B * 2 * 4 * L * 4
    # temperature 1: the [m, T + 1, V] logits (the LM head skips the prompt) stay saved, their gradient comes as
    # two float32 [m, T, V] pieces
    assert item(plan, "logits or their copy", "update backward") == m * (T + 1) * V * 4 + 2 * m * T * V * 4
    hot = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, temperature=0.7))
    # another temperature: a scaled float32 [m, T, V] copy is saved instead, and the logits are freed
    assert (
        item(estimate_memory(hot, "grpo", shape), "logits or their copy", "update backward")
        == 3 * m * T * V * 4
    )


def big_micro_batch() -> PPOConfig:
    sampling = dataclasses.replace(PPOConfig().sampling, max_new_tokens=64)
    return PPOConfig(
        total_episodes=64, rollout_batch_size=64, mini_batch_size=64, micro_batch_size=64, sampling=sampling
    )


def test_start_up_refuses_a_run_that_does_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_config().save_pretrained(tmp_path)
    monkeypatch.setattr(plan_mod, "available_memory", lambda device: 64 * 2**20)
    cfg = big_micro_batch()
    with pytest.raises(ConfigError) as err:
        check_memory_at_start(cfg, "ppo", str(tmp_path), 1, "cpu")
    plan = estimate_memory(cfg, "ppo", tmp_path, available=64 * 2**20)
    biggest = max(plan.items, key=lambda it: it.bytes)
    assert f"the largest item is {biggest.what}" in str(err.value)
    assert "to fit, largest saving first" in str(err.value)
    assert "gradient_checkpointing: true: saves" in str(err.value)
    unchecked = dataclasses.replace(cfg, memory_check=False)
    assert check_memory_at_start(unchecked, "ppo", str(tmp_path), 1, "cpu") is None
    monkeypatch.setattr(plan_mod, "available_memory", lambda device: 2**40)
    assert check_memory_at_start(cfg, "ppo", str(tmp_path), 1, "cpu").fits


def test_plan_command_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small_config().save_pretrained(tmp_path / "policy")
    (tmp_path / "run.yaml").write_text(
        "rollout_batch_size: 8\nmini_batch_size: 4\nmicro_batch_size: 2\ntotal_episodes: 16\n"
    )
    args = ["plan", "--config", str(tmp_path / "run.yaml"), "--policy", str(tmp_path / "policy")]
    args += ["--device", "cpu"]
    assert cli_main([*args, "--available_gib", "100"]) == 0
    out = capsys.readouterr().out
    assert "memory plan, per process" in out and "policy AdamW state" in out and "fits, with" in out
    assert cli_main([*args, "--algo", "grpo", "--available_gib", "0.001"]) == 1
    assert "does not fit" in capsys.readouterr().out
    assert cli_main(["plan", "--config", str(tmp_path / "run.yaml")]) == 2  # no --policy
    # sharded over 4 processes, every trained tensor's share is a quarter
    assert cli_main([*args, "--world_size", "4", "--sharding", "fsdp", "--available_gib", "100"]) == 0
    sharded = capsys.readouterr().out
    assert cli_main([*args, "--world_size", "4", "--available_gib", "100"]) == 0
    whole = capsys.readouterr().out

    def adamw(text: str) -> str:
        return next(line for line in text.splitlines() if "policy AdamW state" in line)

    assert adamw(sharded) != adamw(whole)


# ------------------------------------------------------------------ against measured memory


def save_llama(
    path: Path, vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int
) -> None:
    """A randomly initialised Llama and a word-level tokenizer (words w2 ... w{vocab-1}, EOS 1) in ``path``."""
    words = {"<unk>": 0, "<eos>": 1, **{f"w{k}": k for k in range(2, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )
    torch.manual_seed(0)
    config = small_config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv_heads)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)


#: tiny: 20.2M parameters, GRPO; small: 62.9M parameters, PPO (policy, reference and value model): one step of two
#: prompts and one optimiser step, which creates AdamW's state: that step (weights, gradients, both moments, the
#: update's temporaries) is their peak. logits: 6.4M parameters but a 50k vocabulary, GRPO: two steps (the plan is
#: of a step after the first, when AdamW's state exists) whose peak is the rollout forwards' [c, L, V] logits.
MEASURED = {  # model dims (V, h, i, layers, heads, kv heads), algo, steps, the peak phase, config fields
    "tiny": ((8192, 512, 1408, 4, 8, 4), "grpo", 1, "optimizer step", {"rollout_batch_size": 2, "num_generations": 2, "mini_batch_size": 4, "micro_batch_size": 2}),
    "small": ((16384, 768, 2048, 6, 12, 4), "ppo", 1, "optimizer step", {"rollout_batch_size": 2, "mini_batch_size": 2, "micro_batch_size": 1, "ppo_epochs": 1}),
    "logits": ((50000, 64, 128, 1, 2, 1), "grpo", 2, "rollout", {"rollout_batch_size": 4, "num_generations": 4, "mini_batch_size": 16, "micro_batch_size": 8, "sampling": {"max_new_tokens": 24}}),
}  # fmt: skip


@pytest.mark.parametrize("size", list(MEASURED))
def test_estimate_is_within_20_percent_of_the_measured_peak(size: str, tmp_path: Path) -> None:
    dims, algo, steps, peak_phase, fields = MEASURED[size]
    save_llama(tmp_path / "model", *dims)
    logging = {"report_to": ["jsonl"], "progress_bar": False, "save_steps": 0, "report": False}
    config = {"total_episodes": steps * fields["rollout_batch_size"], "max_prompt_length": 16, "device": "cpu",
              "sampling": {"max_new_tokens": 8}, "output_dir": str(tmp_path / "run"), "logging": logging, **fields}  # fmt: skip
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": str(tmp_path / "model"), "algo": algo, "config": config}))
    subprocess.run(
        [sys.executable, str(WORKER), str(spec), str(tmp_path / "out.json")], check=True, timeout=300
    )
    measured = json.loads((tmp_path / "out.json").read_text())["increase"]
    plan = estimate_memory(
        from_dict(PPOConfig if algo == "ppo" else GRPOConfig, config), algo, tmp_path / "model"
    )
    error = plan.total / measured - 1
    print(
        f"{size}: estimate {plan.total / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB ({error:+.1%})"
    )
    figures = f"measured {measured / 2**20:.0f} MiB, estimate {plan.total / 2**20:.0f} MiB\n"
    assert plan.peak_phase == peak_phase, figures + format_plan(plan)
    assert abs(error) < 0.2, figures + format_plan(plan)
