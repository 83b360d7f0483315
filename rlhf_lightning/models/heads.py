"""Scalar heads and last-token scoring for reward and value models.

`last_token_scores` is the one way a scalar is read off a transformer trunk at the last real
token of each row: the reward model in training and export, PPO's reward scoring and the
labeler all call it (through `reward_export.score_rows`). The trunk runs with position ids from
the mask (`masks.position_ids`) and without a KV cache (`trunk_hidden`, which the PPO critic
uses as well), so left- and right-padded rows give the same scores. `ValueHead` maps hidden
states to one scalar per position (the PPO critic on the policy trunk; Ouyang et al. 2022,
"Training language models to follow instructions with human feedback").
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_lightning.models.masks import last_token_index, position_ids


def gather_last(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state (or score) at the last real token of each row.

    `hidden` is [B, T, H] or [B, T]; returns [B, H] or [B].
    """
    index = last_token_index(attention_mask)  # [B]
    rows = torch.arange(hidden.size(0), device=hidden.device)  # [B]
    return hidden[rows, index]  # [B, H] or [B]


def trunk_hidden(
    trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, forward=None
) -> torch.Tensor:
    """Last hidden states Float[B, T, H] of a transformer trunk (`last_hidden_state`) for ids /
    mask Long[B, T], with positions counted over attended tokens and no KV cache. `forward` is
    what to call instead of `trunk` (e.g. its `torch.compile` wrapper).

    The mask is always passed with the positions: transformers reads packed sequences from
    `position_ids` only when the mask is None.
    """
    return (trunk if forward is None else forward)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    ).last_hidden_state  # [B, T, H]


def scalar_head(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A `Linear(H, 1)` head on hidden states [..., H] (cast to the head's dtype) → float32 [...]."""
    return head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def last_token_scores(
    trunk: nn.Module,
    head: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    forward=None,
) -> torch.Tensor:
    """Scalar score per row, read at its last attended token: ids/mask Long[B, T] → Float[B].

    Only the hidden state of that token goes through the head, so padding side and pad id do
    not matter. `forward`: what to call instead of `trunk` (see `trunk_hidden`).
    """
    hidden = trunk_hidden(trunk, input_ids, attention_mask, forward)  # [B, T, H]
    return scalar_head(head, gather_last(hidden, attention_mask))  # [B]


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
