"""Reward-hacking monitor: diversity signals, collapse warning, proxy-up/gold-down warning."""

from __future__ import annotations

import pytest

from rlhf_lightning.ppo.monitor import (
    RewardHackingMonitor,
    distinct_n,
    repeated_ngram_fraction,
    trend,
)


def test_distinct_and_repeat_hand_worked():
    seqs = [["the", "the", "the", "the"], ["a", "b", "c"]]
    # bigrams: (the,the)x3, (a,b), (b,c) → 3 unique / 5
    assert distinct_n(seqs, 2) == pytest.approx(3 / 5)
    # trigrams: seq1 2 × (the,the,the) → 1 − 1/2; seq2 one trigram → 0; mean 0.25
    assert repeated_ngram_fraction(seqs, 3) == pytest.approx(0.25)
    assert trend([1, 2, 3, 4]) == pytest.approx(1.0)
    assert trend([4, 3, 2, 1]) == pytest.approx(-1.0)
    assert trend([1, 1, 1]) == 0.0


def test_collapse_warns_once_when_text_degenerates():
    mon = RewardHackingMonitor(window=3, ngram=2)
    healthy = ["the movie was great fun", "a dull plot and bad acting", "i liked it a lot"]
    assert mon.update(0.0, None, healthy).warnings == []
    report = mon.update(1.0, None, ["the the the the the the"] * 3)
    assert report.signals["collapse"] == 1.0
    assert len(report.warnings) == 1 and "degenerate" in report.warnings[0]
    again = mon.update(1.1, None, ["the the the the the the"] * 3)
    assert again.warnings == [] and again.signals["collapse"] == 1.0


def test_proxy_up_gold_down_warns():
    mon = RewardHackingMonitor(window=4)
    texts = ["some varied words here", "other different words there"]
    warnings = []
    for proxy, gold in [(0.0, 1.0), (0.5, 0.9), (1.0, 0.7), (1.5, 0.4)]:
        report = mon.update(proxy, gold, texts)
        warnings += report.warnings
    assert len(warnings) == 1 and "over-optimisation" in warnings[0]
    assert report.signals["hacking"] == 1.0


def test_both_rising_does_not_warn_and_state_round_trips():
    mon = RewardHackingMonitor(window=3)
    for i in range(5):
        report = mon.update(float(i), float(i) / 2, ["x y z w"])
        assert report.warnings == []
    assert report.signals["gold_trend"] == pytest.approx(1.0)
    clone = RewardHackingMonitor(window=3)
    clone.load_state_dict(mon.state_dict())
    assert clone.update(9.0, 0.0, ["x y z w"]).signals == mon.update(9.0, 0.0, ["x y z w"]).signals


def test_flickering_collapse_warns_once_per_window():
    mon = RewardHackingMonitor(window=4, ngram=2)
    healthy = ["the movie was great fun", "a dull plot and bad acting"]
    bad = ["the the the the the the"] * 2
    warnings = [w for texts in [healthy, bad, healthy, bad, healthy, bad, healthy, healthy, bad]
                for w in mon.update(0.0, None, texts).warnings]  # fmt: skip
    assert len(warnings) == 2  # iterations 2 and 9; the flickers at 4 and 6 are inside the window
