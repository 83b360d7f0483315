"""Running mean / std of the scalar rewards, for `reward.normalize: running`.

`RunningMoments` is immutable: `merged(values, ranks)` returns the moments after one more batch
(Chan et al. parallel update), combining the batch of every data-parallel rank
(`ppo.distributed`), so the moments are those of all rewards seen, the same on every rank and
for any world size. Sums are float64.

Reference: Chan, Golub & LeVeque 1979, "Updating formulae and a pairwise algorithm for computing
sample variances".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlhf_lightning.ppo.distributed import LOCAL, CrossRank

__all__ = ["RunningMoments"]


@dataclass(frozen=True)
class RunningMoments:
    """Count, mean and sum of squared deviations of every reward seen so far."""

    count: int = 0
    """Number of rewards merged."""
    mean: float = 0.0
    """Their mean."""
    m2: float = 0.0
    """Σ (x − mean)² over them."""

    @property
    def std(self) -> float:
        """Sample standard deviation (1.0 until two rewards have been seen)."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def merged(self, values: torch.Tensor, ranks: CrossRank = LOCAL) -> RunningMoments:
        """The moments after merging a batch Float[B] (this rank's part of it)."""
        values = values.detach().double().flatten()  # [B]
        n, total = ranks.sum(torch.stack([values.new_tensor(values.numel()), values.sum()]))
        n = int(n)
        if n == 0:
            return self
        batch_mean = float(total) / n
        batch_m2 = float(ranks.sum(((values - batch_mean) ** 2).sum()))
        merged = self.count + n
        delta = batch_mean - self.mean
        mean = self.mean + delta * n / merged
        m2 = self.m2 + (batch_m2 + delta**2 * self.count * n / merged)
        return RunningMoments(merged, mean, m2)

    def state_dict(self) -> dict:
        """Plain-type state for checkpoints."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_state(cls, state: dict) -> RunningMoments:
        """Inverse of `state_dict`."""
        return cls(state["count"], state["mean"], state["m2"])
