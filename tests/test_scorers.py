"""`module:function` scorers: one convention for PPO rewards, gold functions and labelers.

The floats must be those the replaced loaders gave: PPO's (`functools.partial` of the kwargs,
lists first, per-sample fallback) and the labeler's (factory call, `score_batch`, else one call
per pair).
"""

from __future__ import annotations

import functools
import json

import pytest

from rlhf_lightning.labeling import LookupLabeler, length_score
from rlhf_lightning.ppo.toy import word_frequency
from rlhf_lightning.scorers import BatchScorer, call_scorer, load_scorer, split_import_path
from rlhf_lightning.tasks.sentiment import gold_score

PROMPTS = ["review a", "review b", "review c"]
RESPONSES = ["good good film", "it was bad . bad . bad . bad .", ""]


def _batched(prompts, responses):
    return [float(len(r)) for r in responses]


def _single(prompt, response):
    return float(response.strip().count("a"))


def test_reward_function_gives_the_floats_of_the_ppo_loader():
    scorer = load_scorer(
        "rlhf_lightning.ppo.toy:word_frequency", "model.reward.function", {"word": "good"}
    )
    old = functools.partial(word_frequency, word="good")(PROMPTS, RESPONSES)  # lists, bound kw
    assert scorer(PROMPTS, RESPONSES) == [float(x) for x in old]
    assert isinstance(scorer, BatchScorer) and scorer.batched is None


def test_per_sample_labelers_give_the_floats_of_the_labeling_loader():
    for path, fn in (
        ("rlhf_lightning.tasks.sentiment:gold_score", gold_score),
        ("rlhf_lightning.labeling:length_score", length_score),
    ):
        scorer = load_scorer(path, "labeler")
        assert scorer(PROMPTS, RESPONSES) == [float(fn(p, r)) for p, r in zip(PROMPTS, RESPONSES)]


def test_classes_are_instantiated_with_the_kwargs(tmp_path):
    table = tmp_path / "human.jsonl"
    rows = [{"prompt": p, "response": r, "score": i} for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]  # fmt: skip
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    scorer = load_scorer("rlhf_lightning.labeling:LookupLabeler", "labeler", {"path": str(table)})
    old = LookupLabeler(str(table)).score_batch  # the labeling loader's factory call
    assert scorer(PROMPTS, RESPONSES) == old(PROMPTS, RESPONSES) == [0.0, 1.0, 2.0]
    assert scorer.batched is True


def test_call_scorer_lists_first_then_per_sample_and_errors():
    prompts, responses = ["p", "q"], ["aa b", "abc"]
    assert call_scorer(_batched, prompts, responses, None, "f") == [4.0, 3.0]
    assert call_scorer(_single, prompts, responses, None, "f") == [2.0, 1.0]  # falls back
    assert call_scorer(_single, prompts, responses, False, "f") == [2.0, 1.0]
    with pytest.raises(AttributeError):
        call_scorer(_single, prompts, responses, True, "f")
    with pytest.raises(ValueError, match="f: expected a list of 2 floats"):
        call_scorer(lambda p, r: 1.0, prompts, responses, True, "f")
    with pytest.raises(ValueError, match="f: non-finite score for sample 0"):
        call_scorer(lambda p, r: [float("nan")] * len(r), prompts, responses, True, "f")
    with pytest.raises(ValueError, match="f: fails with lists"):
        call_scorer(lambda p, r: 1.0 / 0.0, prompts, responses, None, "f")


def test_import_errors_are_one_line_and_name_the_key():
    with pytest.raises(ValueError, match="model.reward.function: module 'rlhf_lightning.ppo.toy' has no attribute 'nope'"):  # fmt: skip
        load_scorer("rlhf_lightning.ppo.toy:nope", "model.reward.function")
    with pytest.raises(ValueError, match="labeler: cannot import 'no_such_module_xyz:f'"):
        load_scorer("no_such_module_xyz:f", "labeler")
    with pytest.raises(ValueError, match="model.reward.gold: 'no_colon' is not an import path"):
        split_import_path("no_colon", "model.reward.gold")
    with pytest.raises(ValueError, match="labeler: 'rlhf_lightning.scorers:__all__' is not callable"):  # fmt: skip
        load_scorer("rlhf_lightning.scorers:__all__", "labeler")
