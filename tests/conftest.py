"""Shared fixtures: the toy model, tokenizer and prompts built in-process (no downloads)."""

from __future__ import annotations

import pytest
import torch

from tether.toy import make_toy_model, make_toy_prompts, make_toy_tokenizer

torch.set_num_threads(2)


@pytest.fixture
def toy_tokenizer():
    return make_toy_tokenizer()


@pytest.fixture
def toy_model(toy_tokenizer):
    return make_toy_model(toy_tokenizer, seed=0)


@pytest.fixture
def toy_prompts():
    return make_toy_prompts(64, seed=0)
