"""Bradley–Terry loss and accuracy against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from tether.rewards import bradley_terry_loss


def test_bradley_terry_hand_derived() -> None:
    chosen = torch.tensor([2.0, 0.0, 1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 3.0])
    # d = chosen - rejected = [2, 0, -2];  -logsigmoid(d) = log(1 + exp(-d))
    #   log(1 + e^-2) = 0.126928, log 2 = 0.693147, log(1 + e^2) = 2.126928;  mean = 2.947003 / 3 = 0.982334
    loss, accuracy = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(0.982334, abs=1e-6)
    # ties count as wrong: only row 0 has chosen > rejected
    assert accuracy.item() == pytest.approx(1 / 3)
    # d loss / d chosen_i = -sigmoid(-d_i) / B:  -0.119203 / 3, -0.5 / 3, -0.880797 / 3
    loss.backward()
    assert chosen.grad is not None
    assert chosen.grad.tolist() == pytest.approx([-0.039734, -0.166667, -0.293599], abs=1e-6)


def test_bradley_terry_margin() -> None:
    # margin [1, 0, 0] -> d = [1, 0, -2]: log(1 + e^-1) = 0.313262;  (0.313262 + 0.693147 + 2.126928) / 3
    loss, accuracy = bradley_terry_loss(
        torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 3.0]), torch.tensor([1.0, 0.0, 0.0])
    )
    assert loss.item() == pytest.approx(1.044446, abs=1e-6)
    assert accuracy.item() == pytest.approx(1 / 3)  # the margin does not change which answer scores higher


def test_bradley_terry_is_stable_for_large_gaps() -> None:
    # -log(sigmoid(-100)) would underflow to inf; -logsigmoid gives log(1 + e^100) = 100 (to float precision).
    loss, accuracy = bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([0.0]))
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(100.0)
    assert accuracy.item() == 0.0


def test_bradley_terry_shape_errors() -> None:
    with pytest.raises(ValueError, match="must both be"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2))
