"""RunningNorm and reward-model gain/bias normalisation (hand-computed values, save/load round trip)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_rewards_helpers import gpt_tokenizer, tiny_gpt2_rm
from transformers import AutoModelForSequenceClassification

from tether.rewards import (
    RewardError,
    RunningNorm,
    build_reward,
    gain_bias_for,
    normalize_reward_model,
    score_texts,
)


def test_running_norm_hand_computed() -> None:
    norm = RunningNorm()
    norm.update(torch.tensor([1.0, 2.0, 3.0]))
    # mean 2, unbiased var ((1)^2 + 0 + 1^2) / 2 = 1
    assert norm.mean == pytest.approx(2.0) and norm.var == pytest.approx(1.0)
    assert norm.normalize(torch.tensor([4.0, 2.0])).tolist() == pytest.approx([2.0, 0.0])
    norm.update(torch.tensor([5.0]))
    # all four: [1, 2, 3, 5], mean 2.75; squared deviations 3.0625 + 0.5625 + 0.0625 + 5.0625 = 8.75;
    # unbiased var 8.75 / 3 = 2.916667, std 1.707825
    assert norm.count == 4
    assert norm.mean == pytest.approx(2.75)
    assert norm.std == pytest.approx(1.707825, abs=1e-6)
    assert norm.normalize(torch.tensor([2.75 + 1.707825])).item() == pytest.approx(1.0, abs=1e-6)


def test_running_norm_merges_like_one_batch() -> None:
    torch.manual_seed(0)
    data = torch.randn(1000, dtype=torch.float64) * 3 + 7
    norm = RunningNorm()
    for chunk in data.split(37):
        norm.update(chunk)
    assert norm.mean == pytest.approx(data.mean().item(), abs=1e-12)
    assert norm.var == pytest.approx(data.var().item(), abs=1e-10)


def test_running_norm_clip_shift_and_state() -> None:
    norm = RunningNorm(clip=3.0)
    norm.update(torch.tensor([1.0, 2.0, 3.0]))  # mean 2, std 1
    assert norm.normalize(torch.tensor([100.0, -100.0, 2.5])).tolist() == pytest.approx([3.0, -3.0, 0.5])
    unshifted = RunningNorm(shift_mean=False)
    unshifted.update(torch.tensor([1.0, 2.0, 3.0]))
    assert unshifted.normalize(torch.tensor([4.0])).item() == pytest.approx(4.0)  # 4 / std 1, mean kept
    restored = RunningNorm(clip=3.0)
    restored.load_state_dict(norm.state_dict())
    assert restored.normalize(torch.tensor([2.5])).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2 scores"):
        empty = RunningNorm()
        empty.update(torch.tensor([1.0]))
        empty.normalize(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="non-finite"):
        norm.update(torch.tensor([math.nan]))


def test_gain_bias_hand_computed() -> None:
    # [1, 3]: mean 2, unbiased std sqrt(2);  gain = 1 / sqrt(2) = 0.707107, bias = -2 / sqrt(2) = -1.414214
    gain, bias = gain_bias_for(torch.tensor([1.0, 3.0]))
    assert gain == pytest.approx(0.707107, abs=1e-6) and bias == pytest.approx(-1.414214, abs=1e-6)
    with pytest.raises(RewardError, match="same score"):
        gain_bias_for(torch.tensor([2.0, 2.0]))


def test_normalized_reward_model_survives_save_and_load(tmp_path: os.PathLike[str]) -> None:
    tok = gpt_tokenizer()
    model = tiny_gpt2_rm(tok)
    prompts = ["the cat ", "a dog ", "the mat ", "x ", "y z ", "good ", "bad ", "c "]
    responses = ["sat on the mat", "good", "bad bad", "a b c", "q w", "dog", "cat sat", "on"]
    raw = score_texts(model, tok, [p + r for p, r in zip(prompts, responses, strict=True)])
    assert abs(raw.mean().item()) > 0.1  # the raw scores are not already normalised
    gain, bias = normalize_reward_model(model, tok, prompts, responses)
    # calling it again uses the raw head output: the same gain/bias, not a compounded one
    assert normalize_reward_model(model, tok, prompts, responses) == pytest.approx((gain, bias))
    path = os.path.join(tmp_path, "rm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(path)
    assert reloaded.config.tether_reward_gain == pytest.approx(gain)
    scores = build_reward(path)(prompts, responses).scores
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(scores, gain * raw + bias, atol=1e-5)
