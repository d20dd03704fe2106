"""Sampling: the KL-safety check, EOS truncation, the missing-EOS penalty and clean generation."""

from __future__ import annotations

import pytest
import torch

from tether.sampling import (
    KLBiasError,
    SamplingConfig,
    check_sampling_config,
    generate,
    missing_eos_penalty,
    truncate_at_eos,
)
from tether.toy import make_toy_model, make_toy_tokenizer


@pytest.fixture()
def toy():
    tokenizer = make_toy_tokenizer()
    model = make_toy_model(tokenizer)
    model.eval()
    return tokenizer, model


def test_check_sampling_config_accepts_pure_sampling() -> None:
    check_sampling_config(SamplingConfig())
    check_sampling_config(SamplingConfig(max_new_tokens=5, temperature=0.7, top_k=0, top_p=1.0))


@pytest.mark.parametrize(
    "field,value",
    [("top_k", 50), ("top_p", 0.9), ("min_new_tokens", 5), ("repetition_penalty", 1.2)],
)
def test_check_sampling_config_refuses_kl_biasing_settings(field: str, value: float) -> None:
    cfg = SamplingConfig(**{field: value})
    with pytest.raises(KLBiasError) as info:
        check_sampling_config(cfg)
    message = str(info.value)
    assert f"{field}={value}" in message
    assert "negative" in message
    assert isinstance(info.value, ValueError)


def test_sampling_config_validates_its_own_fields() -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)


def test_truncate_at_eos_by_hand() -> None:
    eos, pad = 1, 0
    ids = torch.tensor(
        [
            [5, 1, 7, 1],  # EOS in the middle: kept, everything after -> pad (a later EOS too)
            [5, 6, 7, 8],  # no EOS: all four kept
            [1, 6, 7, 8],  # EOS at position 0: a response of one token, the EOS
            [5, 6, 7, 1],  # EOS as the last token
        ]
    )
    out = truncate_at_eos(ids, [eos], pad)
    assert out.response_ids.tolist() == [[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0], [5, 6, 7, 1]]
    assert out.response_mask.tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
        [True, True, True, True],
    ]
    assert out.response_mask.dtype == torch.bool
    assert out.has_eos.tolist() == [True, False, True, True]


def test_truncate_at_eos_with_several_eos_ids() -> None:
    # EOS ids 1 and 2 (e.g. <eos> and <|im_end|>); pad 9; the first of either ends the response
    ids = torch.tensor([[5, 2, 1, 8], [5, 6, 1, 2], [5, 6, 7, 8]])
    out = truncate_at_eos(ids, [1, 2], pad_token_id=9)
    assert out.response_ids.tolist() == [[5, 2, 9, 9], [5, 6, 1, 9], [5, 6, 7, 8]]
    assert out.response_mask.sum(-1).tolist() == [2, 3, 4]
    assert out.has_eos.tolist() == [True, True, False]
    # with only id 1 counted, row 0 runs on to position 2
    assert truncate_at_eos(ids, [1], 9).response_mask.sum(-1).tolist() == [3, 3, 4]


def test_missing_eos_penalty() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0])
    has_eos = torch.tensor([True, False, True])
    # only the row without EOS loses 1.5: 2.0 - 1.5 = 0.5
    torch.testing.assert_close(missing_eos_penalty(scores, has_eos, 1.5), torch.tensor([1.0, 0.5, 3.0]))
    torch.testing.assert_close(missing_eos_penalty(scores, has_eos, None), scores)
    torch.testing.assert_close(missing_eos_penalty(scores, has_eos, -1.0), torch.tensor([1.0, 3.0, 3.0]))


@pytest.mark.parametrize("eos_tokens", [["<eos>"], [".", "!"]])
def test_generate_stops_at_eos_and_pads_after_it(toy, eos_tokens: list[str]) -> None:
    """Tokens after the first EOS are only pad; EOS ids the model's own config does not know count too."""
    tokenizer, model = toy
    eos_ids = tokenizer.convert_tokens_to_ids(eos_tokens)
    eos_arg = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    pad = tokenizer.unk_token_id  # a pad distinct from every EOS, so "after EOS" is visible in the ids
    assert pad not in eos_ids
    enc = tokenizer(["abc", "hello", "xy"] * 8, return_tensors="pt", padding=True)
    P = enc.input_ids.shape[1]
    torch.manual_seed(0)
    out = generate(model, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=24), eos_arg, pad)
    assert out.scores is None
    assert torch.equal(out.sequences[:, :P], enc.input_ids)
    response = out.sequences[:, P:]
    T = response.shape[1]
    assert 1 <= T <= 24
    is_eos = torch.isin(response, torch.tensor(eos_ids))
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full((24,), T))
    # the test only means something if some rows did stop well before the end
    assert (first < T - 2).sum() >= 5
    for row, f in zip(response, first.tolist(), strict=True):
        assert (row[f + 1 :] == pad).all(), row.tolist()
    # and truncation recovers exactly the same cut
    cut = truncate_at_eos(response, eos_ids, pad)
    assert torch.equal(cut.response_ids, response)
    assert cut.has_eos.tolist() == (first < T).tolist()


def test_generate_ignores_the_models_own_generation_defaults(toy) -> None:
    """A model whose generation_config.json sets top_k/top_p/repetition_penalty still samples purely."""
    tokenizer, model = toy
    model.generation_config.top_k = 5
    model.generation_config.top_p = 0.5
    model.generation_config.repetition_penalty = 2.0
    eos = tokenizer.eos_token_id
    enc = tokenizer(["abcab"] * 300, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    cfg = SamplingConfig(max_new_tokens=1, temperature=0.7)
    out = generate(
        model, enc.input_ids, enc.attention_mask, cfg, eos, tokenizer.pad_token_id, output_scores=True
    )
    # 1. the processed scores of the first step are exactly logits / temperature: top-k or top-p would
    #    put -inf on most tokens, a repetition penalty would change the scores of 'a', 'b' and 'c'.
    with torch.no_grad():
        logits = model(input_ids=enc.input_ids[:1]).logits[0, -1]
    assert out.scores is not None and len(out.scores) == 1
    assert torch.isfinite(out.scores[0]).all()
    torch.testing.assert_close(out.scores[0], (logits / 0.7).expand_as(out.scores[0]), rtol=0, atol=1e-5)
    # 2. the near-uniform random model gives many distinct first tokens over 300 samples: top_k=5 allows 5,
    #    top_p=0.5 about half of the 32
    first_tokens = out.sequences[:, enc.input_ids.shape[1]]
    assert first_tokens.unique().numel() > 24
    # 3. the model's own settings are restored afterwards
    assert model.generation_config.top_k == 5
    assert model.generation_config.top_p == 0.5
    assert model.generation_config.repetition_penalty == 2.0


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(max_new_tokens=20),
        SamplingConfig(max_new_tokens=20, temperature=0.7),
        SamplingConfig(max_new_tokens=20, top_k=6, min_new_tokens=5, allow_biased=True),
        SamplingConfig(max_new_tokens=20, top_p=0.8, temperature=1.3, allow_biased=True),
    ],
    ids=["pure", "temperature", "top_k+min_new_tokens", "top_p"],
)
def test_the_lean_sampling_loop_draws_generates_tokens_and_keeps_their_logprobs(toy, cfg, monkeypatch) -> None:
    """tether's loop (KV cache, one logprob per token) gives transformers' generate's tokens for the same seed
    when it draws with generate's own ``multinomial`` (its own draw is tested against the distribution below),
    and the logprobs of generate's processed scores, on left-padded prompts of several lengths."""
    import tether.sampling
    from tether.logprobs import entropy_from_logits, policy_logprobs, selective_log_softmax
    from tether.sampling import sample, truncate_at_eos

    monkeypatch.setattr(tether.sampling, "draw_tokens", lambda p: torch.multinomial(p, num_samples=1).squeeze(1))
    tokenizer, model = toy
    eos, pad = tokenizer.eos_token_id, tokenizer.unk_token_id  # a pad distinct from EOS
    enc = tokenizer(["abc", "hello there", "xy", "a"] * 6, return_tensors="pt", padding=True)
    P = enc.input_ids.shape[1]
    torch.manual_seed(3)
    ref = generate(model, enc.input_ids, enc.attention_mask, cfg, eos, pad, output_scores=True)
    torch.manual_seed(3)
    with torch.no_grad():
        tokens, logprobs, model_logprobs, entropy = sample(model, enc.input_ids, enc.attention_mask, cfg, [eos], pad)
    assert torch.equal(tokens, ref.sequences[:, P:])
    assert ((tokens == eos).any(-1)).sum() >= 3  # some rows stopped early: padding after EOS was exercised
    assert ref.scores is not None and logprobs is not None
    expected = selective_log_softmax(torch.stack(ref.scores, dim=1), tokens, 1.0)
    live = tokens != pad
    torch.testing.assert_close(logprobs[live], expected[live], rtol=0, atol=1e-5)
    if cfg.min_new_tokens:
        assert not (tokens[:, : cfg.min_new_tokens] == eos).any()
    # the model's own logprobs and entropy: what the training forward over the same tokens computes
    upto_eos = truncate_at_eos(tokens, [eos], pad).response_mask  # a row may sample the pad id before its EOS
    ids = torch.cat([enc.input_ids, tokens], 1)
    att = torch.cat([enc.attention_mask, upto_eos.long()], 1)
    live = upto_eos
    with torch.no_grad():
        fwd = policy_logprobs(model, ids, att, P, cfg, [eos])
    torch.testing.assert_close(model_logprobs[live], fwd.model_logprobs[live], rtol=0, atol=1e-5)
    torch.testing.assert_close(logprobs[live], fwd.logprobs[live], rtol=0, atol=1e-5)
    own_entropy = entropy_from_logits(fwd.logits, cfg.temperature)
    torch.testing.assert_close(entropy[live], own_entropy[live], rtol=0, atol=1e-5)
    if cfg.allow_biased:  # the warped and the model's own distributions really differ here
        assert (model_logprobs[live] - logprobs[live]).abs().max() > 1e-2


def test_draw_tokens_samples_the_categorical_distribution() -> None:
    """The inverse-CDF draw against the exact distribution: frequencies over 200,000 draws of a skewed row within
    5 standard errors of each probability, a zero-probability entry (first, middle, last) never drawn, and the
    unnormalised row drawn as its normalised self."""
    from tether.sampling import draw_tokens

    torch.manual_seed(0)
    p = torch.tensor([0.0, 0.5, 0.25, 0.0, 0.125, 0.0625, 0.0625 - 1e-4, 1e-4, 0.0])
    n = 200_000
    rows = draw_tokens((3 * p).expand(n, -1))  # unnormalised: total 3
    counts = torch.bincount(rows, minlength=p.numel()).double()
    assert counts[p == 0].sum() == 0
    freq = counts / n
    se = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p.double()).abs() <= 5 * se + 1e-12).all(), (freq, p)
    assert counts[7] > 0  # the 1e-4 entry is drawn (~20 times expected)
    # the extremes of the uniform number: u = 0 gives the first positive entry, u -> 1 the last positive one
    for u, expected in ((0.0, 1), (1.0 - 2**-53, 7)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "rand", lambda shape, dtype, device, u=u: torch.full(shape, u, dtype=dtype))
            assert draw_tokens(p[None]).item() == expected
    with pytest.raises(ValueError, match="NaN, inf or all zero"):
        draw_tokens(torch.tensor([[0.5, float("nan")]]))
    with pytest.raises(ValueError, match="NaN, inf or all zero"):
        draw_tokens(torch.zeros(1, 4))


def test_importing_tether_bounds_openmp_spinning_unless_the_user_chose(tmp_path) -> None:
    """GOMP_SPINCOUNT must be set before torch starts OpenMP, so importing tether (first) sets it; a user's
    GOMP_SPINCOUNT or OMP_WAIT_POLICY wins."""
    import os
    import subprocess
    import sys

    code = "import tether, os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}

    def seen(**extra: str) -> str:
        run = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True)
        return run.stdout.strip()

    assert seen() == "10000 None"
    assert seen(GOMP_SPINCOUNT="5") == "5 None"
    assert seen(OMP_WAIT_POLICY="PASSIVE") == "None PASSIVE"
