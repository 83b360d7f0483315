"""Reward-hacking monitor: proxy-vs-gold trends and degenerate-output signals.

Over-optimising a learned reward model raises the proxy reward while the true ("gold") objective
falls (Gao et al. 2023, "Scaling Laws for Reward Model Overoptimization"); a common symptom in small
runs is degenerate text such as "the the the" (repeated n-grams, collapsing distinct-n; Li et al.
2016, "A Diversity-Promoting Objective Function for Neural Conversation Models", for distinct-n).

`RewardHackingMonitor.update()` is called once per PPO iteration with the mean proxy reward, the
mean gold score (when a gold labeler is configured) and the sampled responses. It returns scalar
signals to log and warning messages; a warning is issued when a condition starts to hold (not on
every iteration while it keeps holding), at most once per window per kind.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ngrams",
    "distinct_n",
    "repeated_ngram_fraction",
    "trend",
    "MonitorReport",
    "RewardHackingMonitor",
]


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    """All contiguous n-grams of `tokens`."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(sequences: Sequence[Sequence], n: int = 2) -> float:
    """Unique n-grams / total n-grams over all sequences (1.0 = no repetition; nan when no n-gram)."""
    grams = [g for seq in sequences for g in ngrams(seq, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repeated_ngram_fraction(sequences: Sequence[Sequence], n: int = 3) -> float:
    """Mean over sequences of the fraction of n-grams that repeat an earlier n-gram of the same
    sequence ("the the the the" → 1 − 1/2 for n=3). Sequences shorter than n are skipped."""
    fractions = []
    for seq in sequences:
        grams = ngrams(seq, n)
        if grams:
            fractions.append(1.0 - len(set(grams)) / len(grams))
    return sum(fractions) / len(fractions) if fractions else 0.0


def trend(values: Sequence[float]) -> float:
    """Pearson correlation of `values` with time: +1 steadily rising, −1 falling, 0 flat/noisy."""
    xs = [v for v in values if not math.isnan(v)]
    n = len(xs)
    if n < 3:
        return 0.0
    t_mean = (n - 1) / 2
    x_mean = sum(xs) / n
    cov = sum((i - t_mean) * (x - x_mean) for i, x in enumerate(xs))
    var_t = sum((i - t_mean) ** 2 for i in range(n))
    var_x = sum((x - x_mean) ** 2 for x in xs)
    if var_x == 0:
        return 0.0
    return cov / math.sqrt(var_t * var_x)


@dataclass
class MonitorReport:
    """Result of one `update`: scalars to log under `monitor/` and new warnings."""

    signals: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class RewardHackingMonitor:
    """Windowed proxy-vs-gold trend check plus repetition / diversity collapse check.

    Args:
        window: number of recent iterations used for the trends.
        trend_threshold: |correlation with time| above which a series counts as rising / falling.
        ngram: n of distinct-n and of the repeated-n-gram fraction.
        collapse_ratio: warn when distinct-n falls below this fraction of its first value.
        max_repeat: warn when the repeated-n-gram fraction exceeds this.
    """

    def __init__(
        self,
        window: int = 10,
        trend_threshold: float = 0.5,
        ngram: int = 2,
        collapse_ratio: float = 0.5,
        max_repeat: float = 0.5,
    ) -> None:
        if window < 3:
            raise ValueError(f"monitor window must be >= 3, got {window}")
        self.window = window
        self.trend_threshold = trend_threshold
        self.ngram = ngram
        self.collapse_ratio = collapse_ratio
        self.max_repeat = max_repeat
        self.proxy: deque[float] = deque(maxlen=window)
        self.gold: deque[float] = deque(maxlen=window)
        self.baseline_distinct: float | None = None
        self.hacking = False
        self.collapsed = False
        self.iteration = 0
        self.last_warned: dict[str, int] = {}

    def update(
        self, proxy: float, gold: float | None, responses: Sequence[str] | Sequence[Sequence]
    ) -> MonitorReport:
        """Record one iteration. `responses` are texts (split on whitespace) or token sequences."""
        self.iteration += 1
        report = MonitorReport()
        seqs = [r.split() if isinstance(r, str) else list(r) for r in responses]
        distinct = distinct_n(seqs, self.ngram)
        repeat = repeated_ngram_fraction(seqs, self.ngram + 1)
        report.signals[f"distinct_{self.ngram}"] = distinct
        report.signals[f"repeat_{self.ngram + 1}gram"] = repeat
        if self.baseline_distinct is None and not math.isnan(distinct):
            self.baseline_distinct = distinct
        collapsed = repeat > self.max_repeat or (
            self.baseline_distinct is not None
            and not math.isnan(distinct)
            and distinct < self.collapse_ratio * self.baseline_distinct
        )
        if collapsed and not self.collapsed and self._rearmed("collapse"):
            report.warnings.append(
                f"degenerate outputs at iteration {self.iteration}: distinct-{self.ngram}="
                f"{distinct:.3f} (first {self.baseline_distinct:.3f}), repeated "
                f"{self.ngram + 1}-gram fraction={repeat:.3f} — the policy may be collapsing"
            )
        self.collapsed = collapsed
        report.signals["collapse"] = float(collapsed)

        self.proxy.append(float(proxy))
        if gold is not None:
            self.gold.append(float(gold))
        if gold is not None and len(self.gold) == self.window and len(self.proxy) == self.window:
            t_proxy, t_gold = trend(self.proxy), trend(self.gold)
            report.signals["proxy_trend"] = t_proxy
            report.signals["gold_trend"] = t_gold
            hacking = t_proxy > self.trend_threshold and t_gold < -self.trend_threshold
            if hacking and not self.hacking and self._rearmed("hacking"):
                report.warnings.append(
                    f"reward over-optimisation suspected at iteration {self.iteration}: over the "
                    f"last {self.window} iterations the proxy reward rose (trend {t_proxy:+.2f}) "
                    f"while the gold score fell (trend {t_gold:+.2f})"
                )
            self.hacking = hacking
            report.signals["hacking"] = float(hacking)
        return report

    def _rearmed(self, kind: str) -> bool:
        """At most one warning of a kind per `window` iterations (signals flicker near a threshold)."""
        last = self.last_warned.get(kind)
        if last is not None and self.iteration - last < self.window:
            return False
        self.last_warned[kind] = self.iteration
        return True

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state (windows, baseline and flags) for checkpoint resume."""
        return {
            "proxy": list(self.proxy),
            "gold": list(self.gold),
            "baseline_distinct": self.baseline_distinct,
            "hacking": self.hacking,
            "collapsed": self.collapsed,
            "iteration": self.iteration,
            "last_warned": dict(self.last_warned),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`."""
        self.proxy = deque(state["proxy"], maxlen=self.window)
        self.gold = deque(state["gold"], maxlen=self.window)
        self.baseline_distinct = state["baseline_distinct"]
        self.hacking = state["hacking"]
        self.collapsed = state["collapsed"]
        self.iteration = state["iteration"]
        self.last_warned = dict(state.get("last_warned", {}))
