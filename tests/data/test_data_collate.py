"""Collation on hand-written examples: padding sides, -100 labels, RM grouping."""

from __future__ import annotations

import torch

from rlhf_lightning.data.collate import (
    collate_comparisons,
    collate_demonstrations,
    collate_prompts,
)

PAD = 0


def test_sft_right_padding_and_labels_mask_prompt_and_padding():
    examples = [
        {"prompt_ids": [5, 6], "response_ids": [7, 3]},  # 3 = EOS
        {"prompt_ids": [8], "response_ids": [9, 10, 11, 3]},
    ]
    batch = collate_demonstrations(examples, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 3, 0], [8, 9, 10, 11, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 3, -100], [-100, 9, 10, 11, 3]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_rm_stacks_pairs_and_rankings_best_first():
    examples = [
        {"prompt_ids": [5], "responses_ids": [[6, 3], [7, 7, 3]], "margin": 1.5},
        {
            "prompt_ids": [8, 9],
            "responses_ids": [[10, 3], [11, 3], [12, 12, 12, 3]],
            "margin": None,
        },
    ]
    batch = collate_comparisons(examples, pad_id=PAD)
    assert batch["input_ids"].tolist() == [
        [5, 6, 3, 0, 0, 0],
        [5, 7, 7, 3, 0, 0],
        [8, 9, 10, 3, 0, 0],
        [8, 9, 11, 3, 0, 0],
        [8, 9, 12, 12, 12, 3],
    ]
    assert batch["attention_mask"].sum(1).tolist() == [3, 4, 4, 4, 6]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch["group"].tolist() == [0, 0, 1, 1, 1]
    assert batch["rank"].tolist() == [0, 1, 0, 1, 2]
    assert batch["margin"].tolist() == [1.5, 0.0] and batch["margin"].dtype == torch.float32
    assert batch["num_groups"] == 2


def test_pairwise_rows_alternate_chosen_rejected():
    examples = [{"prompt_ids": [4], "responses_ids": [[5, 3], [6, 3]], "margin": None}] * 3
    batch = collate_comparisons(examples, pad_id=PAD)
    assert batch["input_ids"].shape == (6, 3)
    assert batch["rank"].tolist() == [0, 1, 0, 1, 0, 1]
    assert batch["group"].tolist() == [0, 0, 1, 1, 2, 2]


def test_prompts_left_padded_with_texts_and_messages():
    messages = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b c d"}]]
    examples = [
        {"prompt_ids": [5], "prompt_text": "A", "prompt_messages": messages[0]},
        {"prompt_ids": [6, 7, 8], "prompt_text": "BCD", "prompt_messages": messages[1]},
    ]
    batch = collate_prompts(examples, pad_id=3)  # pad == eos must not matter for the mask
    assert batch["input_ids"].tolist() == [[3, 3, 5], [6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert batch["prompt_text"] == ["A", "BCD"]
    assert batch["prompt_messages"] == messages
