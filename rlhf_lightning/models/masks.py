"""Sequence-layout rules shared by every stage: last token, positions, EOS, response text.

One implementation of each rule that the reward model, the PPO rollout, the critic and the
labeler all read sequences by:

- `last_token_index`: the last attended position of each row, found from the mask alone (any
  padding side, any pad/eos ids — tokenizers often use the same id for both);
- `position_ids`: `cumsum(mask) − 1`, the rule `generate` uses for left-padded prompts, so a
  training forward sees the positions the sampler saw;
- `response_mask`: 1 up to and including the first EOS, 0 after it (works when pad == eos);
- `ends_with_eos` and `response_texts`: whether a response terminated, and its text without
  EOS and padding.

Reference: Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (EOS handling,
padding and position ids).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "last_token_index",
    "position_ids",
    "response_mask",
    "ends_with_eos",
    "response_texts",
]


def _id_tensor(token_ids: int | Sequence[int], device: torch.device) -> torch.Tensor:
    """Long[K] of one id or a sequence of ids."""
    ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
    return torch.tensor(ids, dtype=torch.long, device=device)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last nonzero entry of each row of `mask` (Long/Bool[B, T] → Long[B]).

    Rows without any nonzero entry give 0.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)  # [T]
    return ((mask != 0).long() * positions).amax(dim=-1)  # [B]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Long[B, T] positions counting attended tokens only (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_mask(response_ids: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """Long[B, R]: 1 on tokens up to and including the first EOS, 0 after it.

    Works when pad == eos (generation pads finished rows with the pad id).
    """
    is_eos = torch.isin(response_ids, _id_tensor(eos_token_id, response_ids.device))  # [B, R]
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS strictly before t
    return (eos_before == 0).long()  # [B, R]


def ends_with_eos(
    response_ids: torch.Tensor, mask: torch.Tensor, eos_ids: int | Sequence[int]
) -> torch.Tensor:
    """Bool[B]: the last valid token of each response (Long[B, R], `mask` [B, R]) is an EOS."""
    last = last_token_index(mask)  # [B]
    ends = response_ids.gather(1, last[:, None])[:, 0]  # [B]
    return torch.isin(ends, _id_tensor(eos_ids, ends.device))  # [B]


def response_texts(
    tokenizer, response_ids: torch.Tensor, mask: torch.Tensor, eos_ids: int | Sequence[int]
) -> list[str]:
    """Decoded responses: the valid tokens of each row (Long[B, R], `mask` [B, R]) minus EOS ids,
    special tokens skipped, surrounding whitespace stripped."""
    eos = set(_id_tensor(eos_ids, response_ids.device).tolist())
    texts = []
    for ids, valid in zip(response_ids.tolist(), mask.tolist()):
        kept = [t for t, m in zip(ids, valid) if m and t not in eos]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    return texts
