"""Masked statistics over the valid response tokens of every data-parallel rank.

`masked_mean`, `masked_moments`, `masked_var` and `whiten` reduce `[B, R]` tensors over the
positions where `mask` is 1 (valid response tokens); with `ranks: CrossRank` the sums and counts
are all-reduced first, so a batch split over ranks gives the statistics of the whole batch
(`ppo.distributed`). Used by the advantage estimators (`ppo.advantages`, `ppo.estimators`) and the
iteration statistics (`ppo.reporting`).

Reference: Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (whitening over
valid tokens only).
"""

from __future__ import annotations

import torch

from rlhf_lightning.ppo.distributed import LOCAL, CrossRank

__all__ = ["masked_mean", "masked_moments", "masked_var", "whiten"]


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, ranks: CrossRank = LOCAL
) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is true (all dims when `dim` is None).

    With `dim=None` the mean is over the valid positions of every rank (`ranks`, see
    `ppo.distributed`): sums and counts are all-reduced before dividing.
    """
    m = mask.to(x.dtype)
    if dim is None:
        total, count = ranks.sum(torch.stack([(x * m).sum(), m.sum()]))
        return total / count.clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, ranks: CrossRank = LOCAL
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of `x` over the valid positions of every rank (Bessel-corrected when
    `unbiased`): the global mean first, then the global sum of squared deviations from it."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, mask, ranks=ranks)
    squares, n = ranks.sum(torch.stack([(((x - mean) ** 2) * m).sum(), m.sum()]))
    var = squares / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return mean, var


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, ranks: CrossRank = LOCAL
) -> torch.Tensor:
    """Variance of `x` over the valid positions (of every rank; Bessel-corrected when `unbiased`)."""
    return masked_moments(x, mask, unbiased, ranks)[1]


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    ranks: CrossRank = LOCAL,
) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean when `shift_mean`) over valid tokens.

    Statistics come from the valid positions only, of every data-parallel rank (`ranks`), so a
    batch split over ranks is whitened as the whole batch would be; padded positions return 0.
    """
    m = mask.to(x.dtype)
    mean, var = masked_moments(x, mask, ranks=ranks)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m
