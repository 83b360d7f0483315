"""Best-of-N: the analytic KL against an exact computation, proxy-argmax selection (also through
the runner's batch step), and the equal-KL comparison (interpolation, no extrapolation)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhf_lightning.evaluation import run
from rlhf_lightning.evaluation.best_of_n import analytic_kl, compare_at_equal_kl, select
from rlhf_lightning.evaluation.sampling import SampleBatch


def test_analytic_kl_values():
    assert analytic_kl(1) == 0.0
    assert analytic_kl(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    assert analytic_kl(16) == pytest.approx(math.log(16) - 15 / 16, abs=1e-15)
    with pytest.raises(ValueError, match="N must be >= 1"):
        analytic_kl(0)


@pytest.mark.parametrize("n", [2, 4, 16])
def test_analytic_kl_bounds_the_exact_kl_of_best_of_n(n):
    """A base uniform over M outcomes with distinct proxy scores: best-of-N picks the outcome of
    rank i (1 = worst) with probability (i/M)^N − ((i−1)/M)^N. Its exact KL to the base is at
    most log N − (N−1)/N and approaches it as M grows (continuous scores)."""
    m = 1_000_000
    ranks = np.arange(1, m + 1, dtype=np.float64)
    p = (ranks / m) ** n - ((ranks - 1) / m) ** n  # [M] best-of-N distribution
    exact = float(np.sum(p * np.log(p * m)))
    assert exact <= analytic_kl(n)
    assert exact == pytest.approx(analytic_kl(n), abs=1e-4)


def test_select_takes_the_proxy_argmax_of_the_first_n_candidates():
    proxy = np.array([[[0.1, 0.5, 0.3, 0.9]], [[0.7, 0.2, 0.7, 0.1]]])  # [P=2, S=1, N=4]
    assert select(proxy, 1).tolist() == [[0], [0]]
    assert select(proxy, 2).tolist() == [[1], [0]]
    assert select(proxy, 4).tolist() == [[3], [0]]  # tie 0.7 at 0 and 2: the earliest
    with pytest.raises(ValueError, match="outside 1..4"):
        select(proxy, 5)


def test_runner_keeps_the_proxy_best_sample_and_scores_only_kept_ones_with_gold():
    """2 prompts × 2 samples × 4 candidates: rows b·8 + s·4 + c; the proxy score of a row is
    read from its text, gold is called once on the union of kept rows."""
    proxy_of = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]  # [B·S·N] = 16 rows
    texts = [f"r{i}" for i in range(16)]
    samples = SampleBatch(
        messages=[[{"role": "user", "content": "p0"}], [{"role": "user", "content": "p1"}]],
        per_prompt=8,
        prompt_ids=torch.zeros(16, 2, dtype=torch.long),
        prompt_mask=torch.ones(16, 2, dtype=torch.long),
        response_ids=torch.zeros(16, 3, dtype=torch.long),
        response_mask=torch.ones(16, 3, dtype=torch.long),
        texts=texts,
        ends=[True] * 16,
    )
    gold_calls = []

    def gold(messages, responses, ends):
        gold_calls.append(list(responses))
        return [10.0 * int(r[1:]) for r in responses]

    model = object()
    session = SimpleNamespace(
        cfg=SimpleNamespace(
            sampling=SimpleNamespace(samples_per_prompt=2, batch_size=2, temperature=1.0)
        ),
        proxy=lambda messages, responses, ends: [float(proxy_of[int(r[1:])]) for r in responses],
        gold=gold,
        reference=model,  # the base is the reference: log-ratios are exactly 0
    )
    rows = {n: run.PolicySamples("bon", n=n) for n in (1, 2, 4)}
    run._best_of_n_batch(session, model, samples, [1, 2, 4], rows)
    assert rows[1].texts == ["r0", "r4", "r8", "r12"]  # candidate 0 of each (prompt, sample)
    assert rows[2].texts == ["r0", "r5", "r8", "r12"]  # argmax of 2: 3>1, 5<9, 5>3, 9>7
    assert rows[4].texts == ["r2", "r5", "r11", "r12"]  # argmax of 4; 9 tied at 12 and 14: first
    assert rows[4].proxy == [4.0, 9.0, 8.0, 9.0]
    assert rows[4].gold == [20.0, 50.0, 110.0, 120.0] and rows[4].logratio == [0.0] * 4
    (called,) = gold_calls
    assert sorted(called) == sorted({"r0", "r4", "r8", "r12", "r5", "r2", "r11"})


def test_compare_at_equal_kl_interpolates_and_refuses_to_extrapolate():
    curve_kl, curve_gold = [0.0, 0.2, 0.6], [0.0, 0.4, 0.7]
    inside = compare_at_equal_kl(0.4, 0.6, curve_kl, curve_gold)
    assert inside["in_range"] and inside["kl_range"] == [0.0, 0.6]
    assert inside["bon_gold_at_kl"] == pytest.approx(0.55, abs=1e-12)
    assert inside["gold_minus_bon"] == pytest.approx(0.05, abs=1e-12)
    outside = compare_at_equal_kl(1.0, 0.9, curve_kl, curve_gold)
    assert not outside["in_range"]
    assert outside["bon_gold_at_kl"] is None and outside["gold_minus_bon"] is None
