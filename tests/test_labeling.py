"""`rlhf label` on a tiny random policy: rankings are valid, deterministic and readable."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_lightning.data.datamodule import RLHFDataModule
from rlhf_lightning.data.records import RecordError
from rlhf_lightning.data.sources import DataSource
from rlhf_lightning.labeling import LookupLabeler, RewardModelLabeler, main, rank_row
from rlhf_lightning.models.loading import ModelSpec, load_sequence_classifier
from rlhf_lightning.models.reward_export import export_reward_model
from rlhf_lightning.scorers import load_scorer

PROMPTS = [f"write a short review of the film {c} ?" for c in "abcdefg"]


@pytest.fixture
def policy_dir(tmp_path, tiny_tokenizer, tiny_config):
    torch.manual_seed(0)
    cfg = {k: v for k, v in tiny_config(len(tiny_tokenizer)).items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**cfg, pad_token_id=tiny_tokenizer.pad_token_id))
    out = tmp_path / "policy"
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def _write_config(tmp_path, policy_dir, name: str) -> str:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        "\n".join(
            [
                f"policy: {{name_or_path: {policy_dir}}}",
                f"prompts: {{path: {prompts}}}",
                f"out: {tmp_path / name}.jsonl",
                "labeler: rlhf_lightning.labeling:length_score",
                "num_responses: 4",
                "max_new_tokens: 8",
                "batch_size: 3",
                "seed: 7",
            ]
        )
    )
    return str(config)


def test_label_writes_rankings_the_datamodule_reads(tmp_path, policy_dir, tiny_tokenizer):
    summary = main(["--config", _write_config(tmp_path, policy_dir, "a")])
    assert summary["prompts"] == len(PROMPTS)
    assert summary["written"] + summary["all_tied"] == len(PROMPTS)
    assert summary["written"] >= 4
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["prompt"] in PROMPTS and len(row["responses"]) >= 2
        # best → worst by the labeler's score, strictly (ties were dropped)
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert len(set(row["scores"])) == len(row["scores"])
        assert row["scores"] == [float(len(r.split())) for r in row["responses"]]

    dm = RLHFDataModule(
        tokenizer=tiny_tokenizer,
        preferences=DataSource(path=str(tmp_path / "a.jsonl"), val_fraction=0.0),
    )
    comparisons = dm.records("preference", "train")
    assert [list(c.responses) for c in comparisons] == [r["responses"] for r in rows]
    batch = next(iter(dm.dataloader("preference", "train", shuffle=False)))
    assert batch["num_groups"] == min(len(rows), dm.batch_size)

    # same seed + config → identical file
    main(
        ["--config", _write_config(tmp_path, policy_dir, "b"), "--out", str(tmp_path / "a2.jsonl")]
    )
    assert (tmp_path / "a2.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()


def test_rank_row_merges_duplicates_and_ties():
    row = rank_row(
        [{"role": "user", "content": "p"}], ["x", "y", "x", "z", " "], [1.0, 3.0, 1.0, 3.0, 9.0]
    )
    assert row == {"prompt": "p", "responses": ["y", "x"], "scores": [3.0, 1.0]}
    assert rank_row([{"role": "user", "content": "p"}], ["x", "y"], [2.0, 2.0]) is None


def test_lookup_labeler_scores_and_lists_missing(tmp_path):
    table = tmp_path / "human.jsonl"
    table.write_text(json.dumps({"prompt": "p", "response": "good", "score": 2}) + "\n")
    scorer = load_scorer("rlhf_lightning.labeling:LookupLabeler", "labeler", {"path": str(table)})
    assert scorer(["p"], ["good"]) == [2.0]
    with pytest.raises(RecordError, match=r"human.jsonl: 1 responses have no score; listed in "):
        scorer(["p", "p"], ["good", "bad"])
    todo = [json.loads(x) for x in (tmp_path / "human.jsonl.todo.jsonl").read_text().splitlines()]
    assert todo == [{"prompt": "p", "response": "bad", "score": None}]
    table.write_text(json.dumps({"prompt": "p", "response": "good"}) + "\n")
    with pytest.raises(RecordError, match="human.jsonl:1: field 'score' is missing"):
        LookupLabeler(str(table))
    table.write_text('\n{"prompt": "p", "response": "good", "score": "high"}\n{oops\n')
    with pytest.raises(RecordError, match=r"human.jsonl:2: field 'score' must be a number \(got 'high'\)"):  # fmt: skip
        LookupLabeler(str(table))
    table.write_text('{"prompt": "p", "response": "good", "score": 1}\n{oops\n')
    with pytest.raises(RecordError, match=r"human.jsonl:2: invalid JSON \(Expecting property name"):  # fmt: skip
        LookupLabeler(str(table))


def test_reward_model_labeler_matches_export_scores(tmp_path, tiny_tokenizer, tiny_config):
    rm = load_sequence_classifier(ModelSpec(config=tiny_config(len(tiny_tokenizer)))).eval()
    export_reward_model(rm, tiny_tokenizer, tmp_path / "rm", {"mean": 0.0, "std": 1.0})
    labeler = RewardModelLabeler(str(tmp_path / "rm"))
    prompts, responses = ["the movie ?", "the plot ?"], ["great", "it was boring and terrible"]
    batched = labeler.score_batch(prompts, responses)
    single = [labeler(p, r) for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert batched[0] != pytest.approx(batched[1])


def test_bad_labeler_path_is_one_line_error():
    with pytest.raises(ValueError, match="labeler: cannot import 'nope.nothing:f'"):
        load_scorer("nope.nothing:f", "labeler")
    with pytest.raises(ValueError, match="labeler: 'no_colon' is not an import path"):
        main(["--policy.name_or_path", "x", "--prompts.path", "p.jsonl", "--out", "o.jsonl",
              "--labeler", "no_colon"])  # fmt: skip
