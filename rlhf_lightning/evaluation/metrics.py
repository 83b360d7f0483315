"""Win rate against a baseline (ties = ½), its paired bootstrap 95% interval, response statistics.

Scores are arranged as Float[P, S] (P prompts × S samples per prompt); a policy's sample (p, s) is
compared with the baseline's sample (p, s), which both policies drew with the same seed (common
random numbers). The win rate is the mean over prompts of the per-prompt mean over s of
1 (policy's gold score higher), ½ (equal) or 0 (lower). Its uncertainty is a percentile bootstrap
over prompts (Efron & Tibshirani 1993, ch. 13): the prompts are resampled with replacement
`resamples` times (numpy's PCG64 generator, seeded, so the interval is reproducible) and the
2.5th / 97.5th percentiles of the resampled win rates are the 95% interval. Resampling whole
prompts keeps each prompt's samples together, and the pairing with the baseline.

Distinct-n is `rlhf_lightning.ppo.monitor.distinct_n` over the whitespace-split words of all
responses (Li et al. 2016).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

from rlhf_lightning.ppo.monitor import distinct_n

__all__ = ["prompt_wins", "win_rate", "bootstrap_interval", "response_stats"]


def prompt_wins(
    policy: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]]
) -> np.ndarray:
    """Float64[P]: per prompt, the mean over samples of 1 / ½ / 0 (policy above / tied / below).

    `policy` and `baseline` are [P, S] score tables paired by (prompt, sample index).
    """
    ours = np.asarray(policy, dtype=np.float64)  # [P, S]
    theirs = np.asarray(baseline, dtype=np.float64)  # [P, S]
    if ours.shape != theirs.shape or ours.ndim != 2:
        raise ValueError(
            f"win rate: score tables must both be [P, S], got {ours.shape} and {theirs.shape}"
        )
    outcome = (ours > theirs) + 0.5 * (ours == theirs)  # [P, S] in {0, ½, 1}
    return outcome.mean(axis=1)  # [P]


def win_rate(policy: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]]) -> float:
    """Mean over prompts of `prompt_wins` (0.5 = as good as the baseline)."""
    return float(prompt_wins(policy, baseline).mean())


def bootstrap_interval(
    values: Sequence[float], *, resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one value per prompt), seeded."""
    data = np.asarray(values, dtype=np.float64)  # [P]
    if data.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, data.size, size=(resamples, data.size))  # [resamples, P]
    means = data[picks].mean(axis=1)  # [resamples]
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def response_stats(
    texts: Sequence[str], lengths: Sequence[int], ends: Sequence[bool], n: int
) -> dict[str, float]:
    """Mean response length (tokens, EOS included), EOS rate and distinct-n of the responses."""
    words = [text.split() for text in texts]
    return {
        "length": statistics.fmean(lengths) if lengths else float("nan"),
        "eos_rate": statistics.fmean(float(e) for e in ends) if ends else float("nan"),
        f"distinct_{n}": distinct_n(words, n),
    }
