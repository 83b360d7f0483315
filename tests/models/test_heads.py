"""last_token_index under left/right padding; gather_last; ValueHead shapes and init."""

from __future__ import annotations

import torch

from rlhf_lightning.models.heads import ValueHead, gather_last, last_token_index


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    # bool masks and an all-padding row
    assert last_token_index(torch.tensor([[True, False], [False, False]])).tolist() == [0, 0]


def test_gather_last_matches_manual_indexing():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # [B, T, H]
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    out = gather_last(hidden, mask)  # [B, H]
    torch.testing.assert_close(out, torch.stack([hidden[0, 1], hidden[1, 3]]))
    scores = hidden[..., 0]  # [B, T]
    torch.testing.assert_close(gather_last(scores, mask), torch.tensor([3.0, 21.0]))


def test_value_head_shape_dtype_and_grad():
    head = ValueHead(16)
    assert torch.all(head.summary.bias == 0)
    hidden = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)  # [B, T, H]
    values = head(hidden)  # [B, T]
    assert values.shape == (2, 5) and values.dtype == torch.float32
    values.sum().backward()
    assert head.summary.weight.grad is not None and hidden.grad is not None
