"""Rollout helpers: EOS masks, positions, reward callables, running moments, resumable loader."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.ppo.rollout import (
    Rollout,
    RunningMoments,
    call_reward_fn,
    load_callable,
    position_ids,
    response_mask,
    trim_left_padding,
)


def test_response_mask_stops_after_first_eos_even_when_pad_is_eos():
    eos = 3
    ids = torch.tensor([[5, 6, 3, 3, 3], [5, 3, 7, 8, 9], [5, 6, 7, 8, 9], [3, 3, 3, 3, 3]])
    assert response_mask(ids, eos).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ]
    assert response_mask(ids, [9, 3])[2].tolist() == [1, 1, 1, 1, 1]


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


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


def _batched(prompts, responses):
    return [float(len(r)) for r in responses]


def _single(prompt, response):
    return float(response.strip().count("a"))


def test_call_reward_fn_batched_single_and_errors():
    prompts, responses = ["p", "q"], ["aa b", "abc"]
    assert call_reward_fn(_batched, prompts, responses, None, "f") == [4.0, 3.0]
    assert call_reward_fn(_single, prompts, responses, None, "f") == [2.0, 1.0]  # falls back
    assert call_reward_fn(_single, prompts, responses, False, "f") == [2.0, 1.0]
    with pytest.raises(AttributeError):
        call_reward_fn(_single, prompts, responses, True, "f")
    with pytest.raises(ValueError, match="non-finite"):
        call_reward_fn(lambda p, r: [float("nan")] * len(r), prompts, responses, True, "f")
    fn = load_callable("rlhf_lightning.ppo.toy:word_frequency", "f")
    assert fn(["x"], ["good bad good good"]) == [0.75]
    with pytest.raises(ValueError, match="no attribute"):
        load_callable("rlhf_lightning.ppo.toy:nope", "model.reward.function")
    with pytest.raises(ValueError, match="cannot import"):
        load_callable("no_such_module_xyz:f", "model.reward.function")


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
