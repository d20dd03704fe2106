"""Log-probabilities and entropies: fast helpers against naive references, and on a toy GPT-2."""

from __future__ import annotations

import math

import pytest
import torch

from tether.logprobs import (
    accepts_logits_to_keep,
    entropy_from_logits,
    position_ids_from_mask,
    response_logits,
    selective_log_softmax,
    sequence_logprobs,
)
from tether.toy import make_toy_model, make_toy_tokenizer


@pytest.fixture(scope="module")
def toy():
    tokenizer = make_toy_tokenizer()
    model = make_toy_model(tokenizer)
    model.eval()
    return tokenizer, model


@pytest.mark.parametrize("temperature", [0.5, 0.7, 1.0, 2.0])
def test_selective_log_softmax_matches_naive(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    index = torch.randint(0, 11, (3, 5), generator=g)
    naive = (
        torch.log_softmax(logits.double() / temperature, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    )
    out = selective_log_softmax(logits, index, temperature)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive, rtol=0, atol=1e-5)


def test_selective_log_softmax_by_hand_and_in_float32() -> None:
    # logits [log 3, 0] -> softmax [0.75, 0.25]; at T = 2: logits [log 3 / 2, 0] -> [sqrt3/(sqrt3+1), 1/(sqrt3+1)]
    logits = torch.tensor([[math.log(3.0), 0.0]])
    index = torch.tensor([0])
    assert selective_log_softmax(logits, index).item() == pytest.approx(math.log(0.75), abs=1e-6)
    s3 = math.sqrt(3.0)
    assert selective_log_softmax(logits, index, 2.0).item() == pytest.approx(
        math.log(s3 / (s3 + 1)), abs=1e-6
    )
    # bfloat16 logits are upcast before the softmax; the result is float32
    out = selective_log_softmax(logits.to(torch.bfloat16), index)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="temperature"):
        selective_log_softmax(logits, index, 0.0)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.5])
def test_entropy_matches_naive(temperature: float) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 9, generator=g) * 2
    p = torch.softmax(logits.double() / temperature, -1)
    naive = -(p * p.log()).sum(-1)
    out = entropy_from_logits(logits, temperature)
    assert out.shape == (2, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive, rtol=0, atol=1e-5)


def test_entropy_by_hand() -> None:
    # uniform over 8 -> log 8; [0.75, 0.25] -> -(0.75 log 0.75 + 0.25 log 0.25) = 0.5623351
    assert entropy_from_logits(torch.zeros(1, 8)).item() == pytest.approx(math.log(8.0), abs=1e-6)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert entropy_from_logits(torch.tensor([[math.log(3.0), 0.0]])).item() == pytest.approx(h, abs=1e-6)


def test_position_ids_from_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    # counting starts at the first real token; padding gets 0
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 2, 2]]


def naive_logprobs(
    model, prompt: list[int], response: list[int], temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token: feed the unpadded prefix, read the last logits, log-softmax at ``temperature``."""
    out, logits_out = [], []
    with torch.no_grad():
        for t, token in enumerate(response):
            prefix = torch.tensor([prompt + response[:t]])
            logits = model(input_ids=prefix).logits[0, -1].double()
            logits_out.append(logits)
            out.append(torch.log_softmax(logits / temperature, -1)[token])
    return torch.stack(out), torch.stack(logits_out)


def _batch(tokenizer, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prompts left-padded to P, responses right-padded to T, with the matching attention mask."""
    pad = tokenizer.pad_token_id
    p_ids = [tokenizer(p)["input_ids"] for p in prompts]
    r_ids = [tokenizer(r)["input_ids"] for r in responses]
    P, T = max(map(len, p_ids)), max(map(len, r_ids))
    ids, mask = [], []
    for p, r in zip(p_ids, r_ids, strict=True):
        ids.append([pad] * (P - len(p)) + p + r + [pad] * (T - len(r)))
        mask.append([0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (T - len(r)))
    return torch.tensor(ids), torch.tensor(mask), P


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_left_padding_invariance_and_naive_loop(toy, temperature: float) -> None:
    tokenizer, model = toy
    prompt, response = "abc", "xyz."
    # alone, no padding
    ids1, mask1, P1 = _batch(tokenizer, [prompt], [response])
    assert (mask1 == 1).all()
    # left-padded in a batch with a longer prompt (and a longer response, so row 0 is also right-padded)
    ids2, mask2, P2 = _batch(tokenizer, [prompt, "hello world"], [response, "mnopq"])
    assert P2 > P1 and (mask2[0] == 0).any()
    with torch.no_grad():
        alone = sequence_logprobs(model, ids1, mask1, P1, temperature)
        batched = sequence_logprobs(model, ids2, mask2, P2, temperature)
    n = len(response)
    torch.testing.assert_close(batched.logprobs[0, :n], alone.logprobs[0], rtol=0, atol=1e-5)

    naive, naive_logits = naive_logprobs(
        model, tokenizer(prompt)["input_ids"], tokenizer(response)["input_ids"], temperature
    )
    torch.testing.assert_close(alone.logprobs[0].double(), naive, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.logprobs[0, :n].double(), naive, rtol=0, atol=1e-5)
    # the returned logits are the raw (not temperature-scaled) logits that predicted each token
    torch.testing.assert_close(batched.logits[0, :n].double(), naive_logits, rtol=0, atol=1e-4)
    # the second row, which has no left padding, also matches its own loop
    naive2, _ = naive_logprobs(
        model, tokenizer("hello world")["input_ids"], tokenizer("mnopq")["input_ids"], temperature
    )
    torch.testing.assert_close(batched.logprobs[1].double(), naive2, rtol=0, atol=1e-5)


def test_sequence_logprobs_applies_the_temperature(toy) -> None:
    tokenizer, model = toy
    ids, mask, P = _batch(tokenizer, ["abc", "hello"], ["def.", "xy"])
    with torch.no_grad():
        at_1 = sequence_logprobs(model, ids, mask, P, 1.0)
        at_07 = sequence_logprobs(model, ids, mask, P, 0.7)
    # same logits either way; the logprobs are log_softmax(logits / T)
    torch.testing.assert_close(at_07.logits, at_1.logits, rtol=0, atol=0)
    expected = (
        torch.log_softmax(at_1.logits.double() / 0.7, -1).gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1)
    )
    torch.testing.assert_close(at_07.logprobs.double(), expected, rtol=0, atol=1e-5)
    assert (at_07.logprobs - at_1.logprobs).abs().max().item() > 1e-2


def test_selective_log_softmax_on_a_single_row() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0])
    # log_softmax([0, 1, 2])[2] = 2 - log(1 + e + e^2) = -0.4076060
    out = selective_log_softmax(logits, torch.tensor(2))
    assert out.shape == ()
    assert out.item() == pytest.approx(2.0 - math.log(1 + math.e + math.e**2), abs=1e-6)


def test_entropy_with_a_masked_vocabulary_entry() -> None:
    # softmax([0, -inf, 0]) = [0.5, 0, 0.5] -> entropy log 2
    out = entropy_from_logits(torch.tensor([[0.0, float("-inf"), 0.0]]))
    assert out.item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_response_logits_runs_the_lm_head_on_the_response_only_and_matches_the_full_forward(toy) -> None:
    """With transformers' ``logits_to_keep`` the head sees the T + 1 last positions only (counted with a hook);
    the logits equal those of a model that computes every position, and the wrappers are looked through."""
    from peft import LoraConfig, get_peft_model

    tokenizer, model = toy
    ids, mask, P = _batch(tokenizer, ["abc", "hello world"], ["xyz.", "mnopq"])
    T = ids.shape[1] - P

    class EveryPosition(torch.nn.Module):  # a forward without logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, use_cache):
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache
            )

    rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[1]))
    try:
        with torch.no_grad():
            kept = response_logits(model, ids, mask, P)
            full = response_logits(EveryPosition(model), ids, mask, P)
    finally:
        hook.remove()
    assert rows == [T + 1, ids.shape[1]]
    assert kept.shape == full.shape == (2, T, model.config.vocab_size)
    torch.testing.assert_close(kept, full, rtol=0, atol=1e-5)
    assert accepts_logits_to_keep(model) and not accepts_logits_to_keep(EveryPosition(model))

    class Wrapped(torch.nn.Module):  # how DDP / FSDP / DeepSpeed hold the model
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    lora = get_peft_model(make_toy_model(tokenizer), LoraConfig(r=2, target_modules=["c_attn"]))
    assert accepts_logits_to_keep(Wrapped(lora)) and accepts_logits_to_keep(Wrapped(model))
