"""Scalar heads and last-token indexing for reward and value models.

`last_token_index` finds the final real token of each row from the attention
mask alone, so it is correct for left and right padding and for any pad/eos ids
(tokenizers often use the same id for pad and eos). `ValueHead` maps hidden
states to one scalar per position (the PPO critic; Ouyang et al. 2022,
"Training language models to follow instructions with human feedback").
"""

from __future__ import annotations

import torch
from torch import nn


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of `attention_mask` (Long[B, T] → Long[B]).

    Rows without any 1 give 0.
    """
    positions = torch.arange(attention_mask.size(-1), device=attention_mask.device)  # [T]
    weighted = (attention_mask != 0).long() * positions  # [B, T]; 0 on padding
    return weighted.argmax(dim=-1)  # [B]


def gather_last(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state (or score) at the last real token of each row.

    `hidden` is [B, T, H] or [B, T]; returns [B, H] or [B].
    """
    index = last_token_index(attention_mask)  # [B]
    rows = torch.arange(hidden.size(0), device=hidden.device)  # [B]
    return hidden[rows, index]  # [B, H] or [B]


class ValueHead(nn.Module):
    """Linear map from hidden states to one scalar per position.

    Initialised with small weights and zero bias so early value estimates start
    near zero and do not swamp the first advantage estimates.
    """

    def __init__(self, hidden_size: int, dropout: float = 0.0, init_std: float | None = None):
        """`hidden_size`: width of the body's hidden states; `dropout`: applied before
        the projection; `init_std`: weight init std (default `1 / sqrt(hidden_size + 1)`)."""
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1)
        std = init_std if init_std is not None else 1.0 / (hidden_size + 1) ** 0.5
        nn.init.normal_(self.summary.weight, std=std)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, H] → values [B, T] (float32)."""
        hidden = self.dropout(hidden_states.to(self.summary.weight.dtype))  # [B, T, H]
        return self.summary(hidden).squeeze(-1).float()  # [B, T]
