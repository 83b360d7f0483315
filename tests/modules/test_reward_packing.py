"""Shared-prompt packed scoring equals padded scoring (values and gradients).

Packed and padded are two float32 routes to the same numbers: the packed one must be within twice
the padded one's error against a float64 padded forward (`within_torch_error`, tests/conftest.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_lightning.models.loading import ModelSpec, load_sequence_classifier
from rlhf_lightning.models.reward_export import score_rows
from rlhf_lightning.modules.reward_packing import (
    pack_groups,
    packing_is_exact,
    score_rows_packed,
    shared_prefix_lengths,
)

# group 0: prompt [5, 6, 7] + 2 responses; group 1: K=3 with prompt [11, 12];
# group 2: a 1-token row, so nothing can be shared
ROWS = [
    [5, 6, 7, 8, 9, 3],
    [5, 6, 7, 10, 3],
    [11, 12, 13, 3],
    [11, 12, 14, 15, 3],
    [11, 12, 3],
    [20],
    [20, 21, 3],
]
GROUP = torch.tensor([0, 0, 1, 1, 1, 2, 2])


def _batch(pad_id: int = 0):
    width = max(map(len, ROWS))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in ROWS])  # [R, T]
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ROWS])  # [R, T]
    return ids, mask


def test_shared_prefix_and_layout():
    ids, mask = _batch()
    assert shared_prefix_lengths(ids, mask, GROUP, 3).tolist() == [3, 2, 0]
    packed, positions, allowed, last = pack_groups(ids, mask, GROUP, 3)
    # prompt once + suffixes: 3+3+2 | 2+2+3+1 | 0+1+3
    assert packed[0].tolist() == [
        5,
        6,
        7,
        8,
        9,
        3,
        10,
        3,
        11,
        12,
        13,
        3,
        14,
        15,
        3,
        3,
        20,
        20,
        21,
        3,
    ]
    assert positions[0, :8].tolist() == [0, 1, 2, 3, 4, 5, 3, 4]
    assert last.tolist() == [5, 7, 11, 14, 15, 16, 19]
    # the second response sees the prompt and itself, not the first response
    assert allowed[0, 0, 6, :3].all() and not allowed[0, 0, 6, 3:6].any() and allowed[0, 0, 6, 6]
    assert not allowed[0, 0, 8, :8].any()  # a new group sees nothing before it


@pytest.mark.parametrize(
    "attn,per_group", [("sdpa", False), ("eager", False), ("sdpa", True), ("eager", True)]
)
def test_packed_scores_and_grads_equal_padded(tiny_config, attn, per_group, within_torch_error):
    """Dense packed mask or attention per group (`per_group`, `ppo.varlen.masked_segments`):
    scores and every parameter's gradient equal the padded forward's (float32 rule)."""
    config = dict(tiny_config(32), attn_implementation=attn)
    model = load_sequence_classifier(ModelSpec(config=config))
    model64 = copy.deepcopy(model).double()
    ids, mask = _batch(pad_id=3)  # pad == eos
    padded = score_rows(model, ids, mask)  # [R]
    packed = score_rows_packed(model, ids, mask, GROUP, 3, per_group=per_group)  # [R]
    exact = score_rows(model64, ids, mask)  # [R] float64
    within_torch_error(packed, padded, exact, name="scores")
    params = list(model.parameters())
    g_pad = torch.autograd.grad(padded.pow(2).sum(), params)
    g_pack = torch.autograd.grad(packed.pow(2).sum(), params)
    g_exact = torch.autograd.grad(exact.pow(2).sum(), list(model64.parameters()))
    names = [n for n, _ in model.named_parameters()]
    for name, a, b, e in zip(names, g_pack, g_pad, g_exact):
        within_torch_error(a, b, e, name=name)
    assert packing_is_exact(model, 32, per_group=per_group)
    assert model.config._attn_implementation == attn  # switched only during the packed call


def test_group_segments_of_a_packed_row():
    """Segments start where position ids restart — a group, or each row of a group that shares
    nothing (group 2) —; each segment's mask is its block of the dense mask, padded slots seeing
    only themselves, and the dense mask has nothing outside the blocks."""
    from rlhf_lightning.modules.reward_packing import _group_lengths, pack_groups
    from rlhf_lightning.ppo.varlen import masked_segments

    ids, mask = _batch(pad_id=3)
    packed_ids, positions, allowed, _ = pack_groups(ids, mask, GROUP, 3)
    lengths = _group_lengths(packed_ids.shape[1], positions[0])
    assert lengths.tolist() == [8, 8, 1, 3]  # prompt + own tokens; group 2 split by row
    layout = masked_segments(lengths, allowed[0, 0], positions[0])
    start = 0
    for g, n in enumerate(lengths.tolist()):
        block = layout.row_mask[g, 0]
        assert torch.equal(block[:n, :n], allowed[0, 0, start : start + n, start : start + n])
        assert not block[:n, n:].any() and not block[n:, :n].any()  # no padded key / query
        assert torch.equal(block[n:, n:], torch.eye(len(block) - n, dtype=torch.bool))
        assert not allowed[0, 0, start : start + n, :start].any()  # nothing across segments
        start += n


def test_sliding_window_models_pack_per_group_only(within_torch_error):
    """A Mistral RM with a 4-token window over a 3-token prompt and two 5-token responses: per-group
    packed scores equal the padded ones (the window counted in positions, so the second response
    still sees the prompt); the dense 4-D mask, which would replace the window, is refused."""
    from transformers import MistralConfig, MistralForSequenceClassification

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        num_labels=1,
        pad_token_id=0,
    )
    model = MistralForSequenceClassification(config).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 13, 14, 15, 16, 17]])
    mask = torch.ones_like(ids)
    group = torch.tensor([0, 0])
    with torch.no_grad():
        padded = score_rows(model, ids, mask)
        exact = score_rows(copy.deepcopy(model).double(), ids, mask)
        packed = score_rows_packed(model, ids, mask, group, 1, per_group=True)
    within_torch_error(packed, padded, exact, name="scores")
    assert packing_is_exact(model, 32, per_group=True)
    assert not packing_is_exact(model, 32)  # dense mask
