"""Rollout helpers: the Rollout container, left-padding trim, running moments, score shaping."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.ppo.config import RewardConfig
from rlhf_lightning.ppo.distributed import LOCAL
from rlhf_lightning.ppo.rollout import Rollout, SampledLogprobs, trim_left_padding
from rlhf_lightning.ppo.running_moments import RunningMoments
from rlhf_lightning.ppo.scoring import shape_scores


def test_rollout_select_and_concat():
    r = Rollout(
        torch.tensor([[0, 4], [5, 6]]),
        torch.tensor([[0, 1], [1, 1]]),
        torch.tensor([[7, 3], [8, 9]]),
        torch.tensor([[1, 1], [1, 1]]),
        ["a", "b"],
        SampledLogprobs(torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]), torch.ones(2, 2)),
    )
    sub = r.select(torch.tensor([1]))
    assert sub.input_ids.tolist() == [[5, 6, 8, 9]] and sub.prompts == ["b"]
    assert sub.sampled.logprobs.tolist() == [[-3.0, -4.0]] and len(sub) == 1
    assert r.attention_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(AttributeError):  # frozen: no step fills it in later
        r.prompts = []


def test_running_moments_match_torch():
    data = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3 + 1
    rm = RunningMoments()
    for chunk in data.split(7):
        rm = rm.merged(chunk)
    assert rm.mean == pytest.approx(float(data.mean()), abs=1e-5)
    assert rm.std == pytest.approx(float(data.std()), abs=1e-5)
    clone = RunningMoments.from_state(rm.state_dict())
    assert clone == rm and clone.std == rm.std


def test_shape_scores_order_normalise_penalise_clip():
    raw = torch.tensor([1.0, 3.0, -5.0])
    ends = torch.tensor([True, False, True])
    cfg = RewardConfig(function="m:f", normalize="stats", missing_eos_penalty=1.0, clip=1.5)
    shaped, running = shape_scores(
        raw, ends, cfg, {"mean": 1.0, "std": 2.0}, RunningMoments(), LOCAL
    )
    assert shaped.tolist() == [0.0, 0.0, -1.5]  # (r − 1) / 2, −1 without EOS, clip ±1.5
    assert running == RunningMoments()  # untouched unless normalize: running
    cfg = RewardConfig(function="m:f", normalize="running")
    shaped, running = shape_scores(raw, ends, cfg, None, RunningMoments(), LOCAL)
    assert running.count == 3 and running.mean == pytest.approx(-1 / 3)
    torch.testing.assert_close(shaped, (raw - running.mean) / running.std)


def test_select_trims_shared_left_padding():
    r = Rollout(
        torch.tensor([[0, 0, 0, 4], [0, 0, 5, 6], [1, 2, 3, 4]]),
        torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1]]),
        torch.tensor([[7], [8], [9]]),
        torch.tensor([[1], [1], [1]]),
        ["a", "b", "c"],
    )
    short = r.select(torch.tensor([1, 0]))
    assert short.query_ids.tolist() == [[5, 6], [0, 4]]
    assert short.query_mask.tolist() == [[1, 1], [0, 1]] and short.prompts == ["b", "a"]
    assert r.select(torch.tensor([2, 0])).query_ids.shape == (2, 4)  # a full-width row
    empty_ids, empty_mask = trim_left_padding(torch.zeros(2, 3).long(), torch.zeros(2, 3).long())
    assert empty_ids.shape == (2, 1) and empty_mask.sum() == 0
