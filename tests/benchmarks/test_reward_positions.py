"""The exact-work count behind the reward-model speed target (`benchmarks/reward_positions.py`),
on pairs small enough to count by hand."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `benchmarks` is not installed

from benchmarks.reward_positions import packed_positions, padded_positions  # noqa: E402


def test_positions_by_hand():
    pairs = [(10, 6, 4), (3, 5, 2), (8, 8, 7)]  # (chosen, rejected, shared)
    assert packed_positions(pairs) == (10 + 6 - 4) + (3 + 5 - 2) + (8 + 8 - 7)
    # batches of 2 in this order: rows padded to 10, then a last batch of one pair padded to 8
    assert padded_positions(pairs, [0, 1, 2], batch=2) == 2 * 2 * 10 + 2 * 1 * 8
    assert padded_positions(pairs, [1, 2, 0], batch=2) == 2 * 2 * 8 + 2 * 1 * 10
