"""torchmetrics for reward models: pairwise accuracy and running reward moments.

`PairwiseAccuracy` counts, over all (better, worse) pairs seen, the fraction where the
model scores the better response strictly higher (ties count as wrong: a constant reward
model gets 0, not 50 %). `RewardMoments` accumulates count / sum / sum of squares, so its
mean and standard deviation are exact over an epoch and reduce correctly across
processes (states are summed). Both follow the torchmetrics `Metric` contract
(`update` / `compute` / `reset`), see https://lightning.ai/docs/torchmetrics/stable/pages/implement.html.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class PairwiseAccuracy(Metric):
    """Fraction of pairs with `r_better - r_worse > 0`."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state(
            "correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, diff: torch.Tensor) -> None:
        """`diff: [P]` = reward(better) − reward(worse) per pair."""
        diff = diff.detach()  # [P]
        self.correct += (diff > 0).sum().to(torch.float64)
        self.total += diff.numel()

    def compute(self) -> torch.Tensor:
        return (self.correct / self.total.clamp_min(1)).float()


class RewardMoments(Metric):
    """Running mean / std (population) of a stream of scalar rewards."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("count", "total", "total_sq"):
            self.add_state(
                name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, values: torch.Tensor) -> None:
        """`values: [N]` rewards."""
        values = values.detach().to(torch.float64).flatten()  # [N]
        self.count += values.numel()
        self.total += values.sum()
        self.total_sq += values.pow(2).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp_min(1)
        mean = self.total / count
        var = (self.total_sq / count - mean.pow(2)).clamp_min(0.0)
        return {"mean": mean.float(), "std": var.sqrt().float(), "count": self.count.float()}
