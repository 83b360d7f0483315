"""Sequence-layout rules: last token, positions, EOS mask/termination, response texts.

Each shared rule replaced several copies; the tests pin it to the formulas it replaced.
"""

from __future__ import annotations

import torch

from rlhf_lightning.models.masks import (
    ends_with_eos,
    last_token_index,
    position_ids,
    response_mask,
    response_texts,
)

EOS = 3
# rows: EOS mid-way then pad (= eos), EOS right away, no EOS, EOS then other ids
RESPONSES = torch.tensor([[5, 6, 3, 3, 3], [3, 3, 3, 3, 3], [5, 6, 7, 8, 9], [5, 3, 7, 8, 9]])


def test_last_token_index_right_left_and_empty_rows():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    # bool masks and an all-padding row (0)
    assert last_token_index(torch.tensor([[True, False], [False, False]])).tolist() == [0, 0]
    assert last_token_index(torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])).tolist() == [
        2,
        0,
        0,
    ]


def test_last_token_index_equals_the_replaced_rules():
    """The argmax rule (`heads.last_token_index`) for any mask, and `mask.sum(1) - 1` (the PPO
    EOS checks) for response masks, which start at position 0 with at least one token."""
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(64, 9, generator=gen) > 0.5).long()  # [64, 9] arbitrary masks
    positions = torch.arange(9)
    argmax_rule = ((masks != 0).long() * positions).argmax(dim=-1)
    assert torch.equal(last_token_index(masks), argmax_rule)
    mask = response_mask(RESPONSES, EOS)
    assert torch.equal(last_token_index(mask), mask.sum(1) - 1)


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_response_mask_stops_after_first_eos_even_when_pad_is_eos():
    assert response_mask(RESPONSES, EOS).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ]
    assert response_mask(RESPONSES, [9, 3])[2].tolist() == [1, 1, 1, 1, 1]
    assert response_mask(RESPONSES, []).sum() == RESPONSES.numel()  # no EOS id: all valid


def test_ends_with_eos_equals_the_gather_at_sum_minus_one():
    mask = response_mask(RESPONSES, EOS)
    ends = RESPONSES.gather(1, (mask.sum(1) - 1)[:, None])[:, 0]  # the replaced formula
    expected = torch.isin(ends, torch.tensor([EOS]))
    assert torch.equal(ends_with_eos(RESPONSES, mask, [EOS]), expected)
    assert ends_with_eos(RESPONSES, mask, EOS).tolist() == [True, True, False, True]
    assert ends_with_eos(RESPONSES, mask, [9]).tolist() == [False, False, True, False]


def test_response_texts_equal_both_replaced_decoders(tiny_tokenizer):
    """PPO's decoder (valid tokens minus EOS ids) and the labeler's (cut at the first EOS)."""
    tok = tiny_tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    words = tok("the movie was great and boring", add_special_tokens=False)["input_ids"]
    rows = [words[:3] + [eos] + [pad] * 3, words[:6] + [eos], [eos] + [pad] * 6, words + [eos]]
    rows = [(r + [pad] * 7)[:7] for r in rows]
    ids = torch.tensor(rows)  # [4, 7]
    mask = response_mask(ids, eos)

    def ppo_decoder(i):
        kept = [t for t, m in zip(ids[i].tolist(), mask[i].tolist()) if m and t != eos]
        return tok.decode(kept, skip_special_tokens=True).strip()

    def labeler_decoder(i):
        row = ids[i].tolist()
        row = row[: row.index(eos)] if eos in row else row
        return tok.decode(row, skip_special_tokens=True).strip()

    texts = response_texts(tok, ids, mask, [eos])
    assert texts == [ppo_decoder(i) for i in range(4)]
    assert texts == [labeler_decoder(i) for i in range(4)]
    assert texts[0] == "the movie was" and texts[2] == ""
