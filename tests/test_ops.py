"""Masked statistics and small helpers of tether.ops, against values derived by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tether.ops import (
    exact_div,
    first_true_index,
    is_prefix_mask,
    last_true_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

NAN = float("nan")


def test_masked_sum_and_mean_by_hand() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.tensor([True, True, False, True])
    # sum over kept entries: 1 + 2 + 4 = 7; mean: 7 / 3
    assert masked_sum(values, mask).item() == pytest.approx(7.0, abs=1e-6)
    assert masked_mean(values, mask).item() == pytest.approx(7.0 / 3.0, abs=1e-6)


def test_masked_mean_along_dim_gives_zero_for_an_empty_row() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    # row 0: (1 + 2) / 2 = 1.5; row 1: empty -> 0 (not NaN); row 2: (7 + 8 + 9) / 3 = 8
    out = masked_mean(values, mask, dim=-1)
    torch.testing.assert_close(out, torch.tensor([1.5, 0.0, 8.0]), rtol=0, atol=1e-6)


def test_masked_mean_of_an_empty_mask_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        masked_mean(torch.ones(3), torch.zeros(3, dtype=torch.bool))


def test_mask_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        masked_mean(torch.ones(2, 3), torch.ones(3, dtype=torch.bool))


def test_masked_var_is_unbiased_by_hand() -> None:
    values = torch.tensor([1.0, 2.0, 4.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    # mean = 7/3; deviations -4/3, -1/3, 5/3; squares 16/9, 1/9, 25/9, sum = 42/9 = 14/3
    # unbiased: (14/3) / (3 - 1) = 7/3; biased: (14/3) / 3 = 14/9
    assert masked_var(values, mask).item() == pytest.approx(7.0 / 3.0, abs=1e-6)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(14.0 / 9.0, abs=1e-6)


def test_masked_whiten_by_hand() -> None:
    values = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    mask = torch.tensor([[True, True], [True, False]])
    # kept: 1, 3, 5 -> mean 3; squared deviations 4, 0, 4 -> unbiased var 8/2 = 4, std 2
    # whitened: (1-3)/2 = -1, (3-3)/2 = 0, (5-3)/2 = 1; the masked entry is exactly 0.
    # (A biased variance 8/3 would give +-1.2247 instead.)
    out = masked_whiten(values, mask)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), rtol=0, atol=1e-6)
    assert out[1, 1].item() == 0.0


def test_masked_whiten_without_shift_keeps_the_mean() -> None:
    values = torch.tensor([1.0, 3.0, 5.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    # same statistics as above: (x - 3) / 2 + 3 -> 2, 3, 4 (mean 3 kept, std now 1); masked entry 0
    out = masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(out, torch.tensor([2.0, 3.0, 4.0, 0.0]), rtol=0, atol=1e-6)
    assert out[3].item() == 0.0
    assert masked_mean(out, mask).item() == pytest.approx(3.0, abs=1e-6)


def test_nan_at_a_masked_position_does_not_leak() -> None:
    values = torch.tensor([1.0, 3.0, NAN, 5.0])
    mask = torch.tensor([True, True, False, True])
    # the kept entries are 1, 3, 5 as above: sum 9, mean 3, unbiased var 4
    assert masked_sum(values, mask).item() == pytest.approx(9.0, abs=1e-6)
    assert masked_mean(values, mask).item() == pytest.approx(3.0, abs=1e-6)
    assert masked_var(values, mask).item() == pytest.approx(4.0, abs=1e-6)
    out = masked_whiten(values, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([-1.0, 0.0, 0.0, 1.0]), rtol=0, atol=1e-6)
    row_means = masked_mean(values.view(2, 2), mask.view(2, 2), dim=-1)
    # row 0: (1 + 3) / 2 = 2; row 1: only 5 kept -> 5
    torch.testing.assert_close(row_means, torch.tensor([2.0, 5.0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kept", [0, 1])
def test_fewer_than_two_entries_raise(kept: int) -> None:
    values = torch.tensor([1.0, 2.0, 3.0])
    mask = torch.zeros(3, dtype=torch.bool)
    mask[:kept] = True
    with pytest.raises(ValueError, match="at least two|empty"):
        masked_var(values, mask)
    with pytest.raises(ValueError, match="at least two|empty"):
        masked_whiten(values, mask)


def test_first_true_index() -> None:
    mask = torch.tensor(
        [
            [False, True, False, True],  # first True at 1 (the second one is ignored)
            [False, False, False, False],  # none -> size of the dim, 4
            [True, False, False, False],  # first True at 0
            [False, False, False, True],  # last position, 3
        ]
    )
    assert first_true_index(mask).tolist() == [1, 4, 0, 3]
    # along dim 0 of the same matrix: columns -> first row with True
    # col 0: row 2; col 1: row 0; col 2: none -> 4; col 3: row 0
    assert first_true_index(mask, dim=0).tolist() == [2, 0, 4, 0]
    # integer masks work too (True = non-zero)
    assert first_true_index(torch.tensor([[0, 0, 1]])).tolist() == [2]


def test_exact_div() -> None:
    assert exact_div(12, 4, "rollout / mini") == 3
    assert exact_div(5, 5, "x") == 1
    with pytest.raises(ValueError, match=r"rollout / mini: 12 is not divisible by 5"):
        exact_div(12, 5, "rollout / mini")
    # b <= 0 is a clear ValueError, not a ZeroDivisionError or a negative count
    with pytest.raises(ValueError, match="not divisible by 0"):
        exact_div(12, 0, "x")
    with pytest.raises(ValueError, match="not divisible by -4"):
        exact_div(12, -4, "x")


def test_whiten_matches_a_float64_reference_on_random_data() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 9, generator=g) * 3.0 + 2.0
    lengths = torch.tensor([9, 0, 3, 7, 1, 5])
    mask = torch.arange(9).unsqueeze(0) < lengths.unsqueeze(1)
    kept = values[mask].double()
    mean, std = kept.mean().item(), kept.std(unbiased=True).item()
    out = masked_whiten(values, mask)
    expected = torch.where(mask, (values.double() - mean) / std, torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    assert math.isclose(out[mask].double().std().item(), 1.0, abs_tol=1e-5)


# Rows shared by the two tests below, each named for the shape of mask it is.
SHAPED_MASKS = torch.tensor(
    [
        [True, True, False, False],  # prefix (a response that ended at its EOS, t=1)
        [False, False, False, False],  # empty response
        [True, True, True, True],  # full row (hit the length limit)
        [True, False, True, False],  # a hole at t=1
        [False, False, True, True],  # left-padded
        [False, False, False, True],  # left-padded, one token at the very end
        [True, False, False, False],  # one-token prefix
    ]
)


def test_last_true_index_by_hand() -> None:
    # last True of each row: 1; none -> -1; 3; 2 (the hole does not end the row); 3; 3; 0
    assert last_true_index(SHAPED_MASKS).tolist() == [1, -1, 3, 2, 3, 3, 0]
    # integer masks: non-zero counts
    assert last_true_index(torch.tensor([[0, 1, 0], [2, 0, 0]])).tolist() == [1, 0]


def test_is_prefix_mask_by_hand() -> None:
    # a prefix (possibly empty or full) is True; a hole or any left padding is not
    assert is_prefix_mask(SHAPED_MASKS).tolist() == [True, True, True, False, False, False, True]
    assert is_prefix_mask(torch.tensor([[1, 1, 0], [0, 1, 1]])).tolist() == [True, False]
