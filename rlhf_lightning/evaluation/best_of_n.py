"""Best-of-N: keep the proxy scorer's best of N samples, and the KL this costs.

For each (prompt, sample index) the base policy draws max(N) candidates; best-of-N keeps the
candidate with the highest proxy score among the first N (ties: the earliest). The candidates are
nested — N = 4 sees N = 2's candidates plus two more — so the curve over N is monotone in the
proxy score by construction and needs max(N) samples, not their sum.

The KL of the best-of-N policy to its base is taken as `log N − (N − 1)/N` nats (Stiennon et al.
2020, "Learning to summarize from human feedback"; Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization", plot best-of-N at this KL); Beirami et al. 2024, "Theoretical guarantees on the
best-of-n alignment policy", show it is an upper bound of the true KL. `compare_at_equal_kl`
reads the curve at an RL policy's KL by linear interpolation between the measured N, and refuses
to extrapolate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["analytic_kl", "select", "compare_at_equal_kl"]


def analytic_kl(n: int) -> float:
    """KL(best-of-N ‖ base) bound `log N − (N − 1)/N` in nats (0 for N = 1)."""
    if n < 1:
        raise ValueError(f"best_of_n.n: N must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def select(proxy: np.ndarray, n: int) -> np.ndarray:
    """Int64[P, S]: index of the proxy-best candidate among the first `n` of Float[P, S, N_max]."""
    if not 1 <= n <= proxy.shape[-1]:
        raise ValueError(f"best-of-N: N = {n} outside 1..{proxy.shape[-1]} candidates")
    return np.argmax(proxy[..., :n], axis=-1)  # [P, S]; argmax keeps the first of tied maxima


def compare_at_equal_kl(
    kl: float, gold: float, curve_kl: Sequence[float], curve_gold: Sequence[float]
) -> dict:
    """A policy (`kl`, `gold`) against the best-of-N curve (points sorted by KL).

    Returns `{"in_range", "bon_gold_at_kl", "gold_minus_bon", "kl_range"}`: inside the curve's KL
    range the curve's gold at `kl` (linear interpolation) and the difference; outside, both None.
    """
    xs = [float(x) for x in curve_kl]
    ys = [float(y) for y in curve_gold]
    low, high = min(xs), max(xs)
    result = {"in_range": low <= kl <= high, "kl_range": [low, high]}
    if not result["in_range"]:
        return {**result, "bon_gold_at_kl": None, "gold_minus_bon": None}
    at = float(np.interp(kl, xs, ys))
    return {**result, "bon_gold_at_kl": at, "gold_minus_bon": gold - at}
