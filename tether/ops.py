"""Masked statistics and small tensor helpers.

Conventions (see DESIGN.md): masks are boolean-like tensors where True means "this entry counts".
Shapes: B batch, T response length.
"""

from __future__ import annotations

import torch


def _as_float_mask(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match values shape {tuple(values.shape)}")
    return mask.to(values.dtype)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is True (over ``dim``, or over everything)."""
    m = _as_float_mask(values, mask)
    # where() rather than multiply: a NaN at a masked-out position must not leak into the sum.
    v = torch.where(m.bool(), values, torch.zeros_like(values))
    return v.sum() if dim is None else v.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the entries where ``mask`` is True.

    With ``dim`` given, rows whose mask is empty give 0 rather than NaN (a response of length zero
    has no tokens to average).
    """
    m = _as_float_mask(values, mask)
    total = masked_sum(values, mask, dim)
    if dim is None:
        count = m.sum()
        if count == 0:
            raise ValueError("masked_mean over an empty mask")
        return total / count
    return total / m.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries (unbiased by default; fewer than two entries is an error)."""
    m = _as_float_mask(values, mask)
    count = m.sum()
    if count < 2:
        raise ValueError(f"masked_var needs at least two masked entries, got {int(count.item())}")
    mean = masked_mean(values, mask)
    centred_sq = (values - mean) ** 2
    var = masked_sum(centred_sq, mask) / count
    if unbiased:
        var = var * (count / (count - 1))
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise masked entries to unit variance (and zero mean when ``shift_mean``).

    ``shift_mean=False`` keeps the original mean (used for rewards, whose sign carries meaning).
    Entries outside the mask are returned as exactly 0.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def first_true_index(mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Index of the first True along ``dim``; the size of ``dim`` where a row has no True.

    [B, T] -> [B]
    """
    size = mask.shape[dim]
    idx = torch.arange(size, device=mask.device)
    shape = [1] * mask.dim()
    shape[dim] = size
    idx = idx.view(shape).expand_as(mask)
    filled = torch.where(mask.bool(), idx, torch.full_like(idx, size))
    return filled.min(dim=dim).values


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True of each row; -1 where a row has none. [B, T] -> [B]."""
    T = mask.shape[-1]
    idx = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.full_like(idx, -1)).max(dim=-1).values


def is_prefix_mask(mask: torch.Tensor) -> torch.Tensor:
    """Whether each row is True up to some position and False after it (no holes, no left padding). [B, T] -> [B]."""
    m = mask.bool()
    return (m.long().cumsum(-1) == torch.arange(1, m.shape[-1] + 1, device=m.device)).sum(-1) == m.sum(-1)


def exact_div(a: int, b: int, what: str) -> int:
    """``a // b``, raising a clear error when ``b`` does not divide ``a``."""
    if b <= 0 or a % b != 0:
        raise ValueError(f"{what}: {a} is not divisible by {b}")
    return a // b
