"""The reward-model loss: Bradley–Terry on pairwise preferences."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PairwiseLoss(NamedTuple):
    """Result of :func:`bradley_terry_loss`.

    Attributes:
        loss: scalar, mean over the B pairs (differentiable).
        accuracy: scalar, fraction of pairs with ``chosen > rejected`` (ties count as wrong), detached.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> PairwiseLoss:
    """Bradley–Terry negative log-likelihood of the preferences: ``mean(-logsigmoid(r_c - r_r - margin))``.

    Args:
        chosen: [B] scores of the preferred texts.
        rejected: [B] scores of the other texts.
        margin: optional [B] required gap (Llama 2's margin loss, Touvron et al. 2023, eq. 2); a larger margin
            asks for a larger gap. Accuracy ignores it.

    ``-logsigmoid`` is used instead of ``-log(sigmoid(.))``, which underflows to ``inf`` for a large negative
    difference (Ouyang et al. 2022 and Stiennon et al. 2020 use the same loss).
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(
            f"chosen and rejected must both be [B], got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    diff = chosen.float() - rejected.float()  # [B]
    if margin is not None:
        if margin.shape != chosen.shape:
            raise ValueError(f"margin must be [B]={tuple(chosen.shape)}, got {tuple(margin.shape)}")
        diff = diff - margin.to(diff)
    loss = -F.logsigmoid(diff).mean()
    accuracy = (chosen.detach() > rejected.detach()).float().mean()
    return PairwiseLoss(loss=loss, accuracy=accuracy)
