"""Win rate (ties ½) and the paired bootstrap interval on hand-worked values; response stats."""

from __future__ import annotations

import pytest

from rlhf_lightning.evaluation.metrics import (
    bootstrap_interval,
    prompt_wins,
    response_stats,
    win_rate,
)


def test_win_rate_pairs_samples_and_counts_ties_as_half():
    policy = [[3.0, 1.0], [2.0, 2.0], [0.0, 5.0]]  # [P=3, S=2]
    baseline = [[1.0, 1.0], [2.0, 3.0], [1.0, 5.0]]
    # prompt 0: win + tie = 0.75; prompt 1: tie + loss = 0.25; prompt 2: loss + tie = 0.25
    assert prompt_wins(policy, baseline).tolist() == [0.75, 0.25, 0.25]
    assert win_rate(policy, baseline) == pytest.approx(1.25 / 3, abs=1e-15)
    assert win_rate(baseline, policy) == pytest.approx(1 - 1.25 / 3, abs=1e-15)
    assert win_rate(baseline, baseline) == 0.5
    with pytest.raises(ValueError, match=r"must both be \[P, S\]"):
        prompt_wins([[1.0, 2.0]], [[1.0]])


def test_bootstrap_interval_of_a_hand_worked_distribution():
    """Per-prompt values [1, 1, 1, 0]: a resampled mean is Binomial(4, 3/4) / 4, so
    P(0) = 1/256 (0.4%) < 2.5% ≤ P(≤ 0.25) = 13/256 (5.1%): the 2.5th percentile is 0.25;
    P(1) = 81/256 (32%) > 2.5%: the 97.5th percentile is 1."""
    assert bootstrap_interval([1.0, 1.0, 1.0, 0.0], resamples=4000, seed=0) == (0.25, 1.0)
    assert bootstrap_interval([1.0, 1.0, 1.0, 0.0], resamples=4000, seed=1) == (0.25, 1.0)
    assert bootstrap_interval([0.5], resamples=50, seed=0) == (0.5, 0.5)  # one prompt: no spread


def test_bootstrap_interval_width_matches_the_normal_approximation():
    """50 wins and 50 losses: the mean's standard error is 0.05, so the 95% interval is about
    0.5 ± 1.96 × 0.05 = [0.402, 0.598] (resampled means move in steps of 0.01)."""
    values = [1.0] * 50 + [0.0] * 50
    low, high = bootstrap_interval(values, resamples=4000, seed=3)
    assert low == pytest.approx(0.402, abs=0.02) and high == pytest.approx(0.598, abs=0.02)
    assert bootstrap_interval(values, resamples=4000, seed=3) == (low, high)  # seeded


def test_response_stats():
    found = response_stats(["a b a b", "c"], [5, 2], [True, False], n=2)
    # bigrams: (a b) (b a) (a b) → 2 distinct of 3; "c" has none
    assert found == {"length": 3.5, "eos_rate": 0.5, "distinct_2": pytest.approx(2 / 3)}
