"""Rollout helpers: the Rollout container, left-padding trim, running moments."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.ppo.rollout import Rollout, RunningMoments, trim_left_padding


def test_rollout_select_and_concat():
    r = Rollout(
        torch.tensor([[0, 4], [5, 6]]),
        torch.tensor([[0, 1], [1, 1]]),
        torch.tensor([[7, 3], [8, 9]]),
        torch.tensor([[1, 1], [1, 1]]),
        scores=torch.tensor([0.5, -1.0]),
    )
    sub = r.select(torch.tensor([1]))
    assert sub.input_ids.tolist() == [[5, 6, 8, 9]] and sub.scores.tolist() == [-1.0]
    assert sub.logprobs is None and len(sub) == 1
    assert r.attention_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]


def test_running_moments_match_torch():
    data = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3 + 1
    rm = RunningMoments()
    for chunk in data.split(7):
        rm.update(chunk)
    assert rm.mean == pytest.approx(float(data.mean()), abs=1e-5)
    assert rm.std == pytest.approx(float(data.std()), abs=1e-5)
    clone = RunningMoments()
    clone.load_state_dict(rm.state_dict())
    assert clone.std == rm.std


def test_select_trims_shared_left_padding():
    r = Rollout(
        torch.tensor([[0, 0, 0, 4], [0, 0, 5, 6], [1, 2, 3, 4]]),
        torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1]]),
        torch.tensor([[7], [8], [9]]),
        torch.tensor([[1], [1], [1]]),
    )
    short = r.select(torch.tensor([1, 0]))
    assert short.query_ids.tolist() == [[5, 6], [0, 4]]
    assert short.query_mask.tolist() == [[1, 1], [0, 1]]
    assert r.select(torch.tensor([2, 0])).query_ids.shape == (2, 4)  # a full-width row
    empty_ids, empty_mask = trim_left_padding(torch.zeros(2, 3).long(), torch.zeros(2, 3).long())
    assert empty_ids.shape == (2, 1) and empty_mask.sum() == 0
