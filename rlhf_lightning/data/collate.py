"""Collators: token-id examples → padded batches for SFT, reward modelling and PPO prompts.

* SFT (`collate_demonstrations`): right padding; `labels` hold the response ids (EOS included)
  and -100 (PyTorch's cross-entropy ignore_index) on prompt and padding positions.
* RM (`collate_comparisons`): all K responses of each prompt are stacked consecutively (best
  first) as separate rows `prompt + response`, right padded, so one forward pass scores every
  response of the batch; `group`/`rank` say which prompt and which place each row belongs to.
* PPO prompts (`collate_prompts`): left padding, so generation continues right after the last
  prompt token of every row.

Examples come from `templates.Tokenizing` (lists of ints). Collators are module-level functions
(bound with `functools.partial`) so DataLoader workers can pickle them.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    """Stack int lists into a Long[N, T] tensor padded with `value` on the left or right."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)  # [N, T]
    for i, row in enumerate(rows):
        if row:
            ids = torch.tensor(row, dtype=torch.long)  # [len]
            if left:
                out[i, width - len(row) :] = ids
            else:
                out[i, : len(row)] = ids
    return out


def _mask(rows: list[list[int]], left: bool) -> torch.Tensor:
    return _pad([[1] * len(r) for r in rows], 0, left)  # [N, T]


def collate_demonstrations(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """SFT batch: input_ids/attention_mask/labels Long[B, T], right padded."""
    rows = [e["prompt_ids"] + e["response_ids"] for e in examples]
    labels = [[IGNORE_INDEX] * len(e["prompt_ids"]) + e["response_ids"] for e in examples]
    return {
        "input_ids": _pad(rows, pad_id, left=False),  # [B, T]
        "attention_mask": _mask(rows, left=False),  # [B, T]
        "labels": _pad(labels, IGNORE_INDEX, left=False),  # [B, T]
    }


def collate_comparisons(examples: list[dict], pad_id: int) -> dict:
    """RM batch: R = Σ K_g rows, grouped by prompt, best response first within each group."""
    rows, group, rank = [], [], []
    for g, e in enumerate(examples):
        for k, response in enumerate(e["responses_ids"]):
            rows.append(e["prompt_ids"] + response)
            group.append(g)
            rank.append(k)
    margins = [0.0 if e["margin"] is None else e["margin"] for e in examples]
    return {
        "input_ids": _pad(rows, pad_id, left=False),  # [R, T]
        "attention_mask": _mask(rows, left=False),  # [R, T]
        "group": torch.tensor(group, dtype=torch.long),  # [R]
        "rank": torch.tensor(rank, dtype=torch.long),  # [R]
        "margin": torch.tensor(margins, dtype=torch.float32),  # [G]
        "num_groups": len(examples),
    }


def collate_prompts(examples: list[dict], pad_id: int) -> dict:
    """PPO prompt batch: input_ids/attention_mask Long[B, P], left padded, plus texts/messages."""
    rows = [e["prompt_ids"] for e in examples]
    return {
        "input_ids": _pad(rows, pad_id, left=True),  # [B, P]
        "attention_mask": _mask(rows, left=True),  # [B, P]
        "prompt_text": [e["prompt_text"] for e in examples],
        "prompt_messages": [e["prompt_messages"] for e in examples],
    }


COLLATORS = {
    "demonstration": collate_demonstrations,
    "preference": collate_comparisons,
    "prompt": collate_prompts,
}
