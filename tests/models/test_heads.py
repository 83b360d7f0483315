"""gather_last; last-token scoring (the one function RM training, export and PPO use); ValueHead.

The shared scoring passes position ids from the mask and no KV cache. On right-padded rows (RM
training, `score_texts`) that must be bitwise the score the RM stage computed before without
position ids, gradients included, and on left-padded rows bitwise PPO's former scorer.
"""

from __future__ import annotations

import torch

from rlhf_lightning.models.heads import ValueHead, gather_last, last_token_scores
from rlhf_lightning.models.loading import ModelSpec, load_sequence_classifier
from rlhf_lightning.models.reward_export import backbone_and_head, score_rows

LENGTHS = [7, 3, 5, 1]


def _reward_model(tiny_config, vocab=40):
    torch.manual_seed(0)
    return load_sequence_classifier(ModelSpec(config=tiny_config(vocab)), vocab_size=vocab)


def _padded(right: bool, vocab=40):
    """ids/mask Long[4, 7] with the rows of LENGTHS, right- or left-padded with id 0."""
    gen = torch.Generator().manual_seed(1)
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        cols = slice(0, n) if right else slice(width - n, width)
        ids[row, cols] = torch.randint(1, vocab, (n,), generator=gen)
        mask[row, cols] = 1
    return ids, mask


def _old_rm_scores(model, ids, mask):
    """The RM stage's former `score_rows`: no position ids, default cache, argmax last index."""
    backbone, head = backbone_and_head(model)
    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state  # [R, T, H]
    last = ((mask != 0).long() * torch.arange(mask.shape[1])).argmax(-1)  # [R]
    return head(hidden[torch.arange(len(ids)), last]).squeeze(-1).float()  # [R]


def _old_ppo_scores(model, ids, mask):
    """PPO's former `score_reward_model`: positions cumsum − 1, no cache, head-dtype cast."""
    trunk, head = backbone_and_head(model)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = trunk(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
    ).last_hidden_state  # [B, T, H]
    pooled = gather_last(hidden, mask)  # [B, H]
    return head(pooled.to(head.weight.dtype)).squeeze(-1).float()  # [B]


def test_scoring_is_bitwise_the_rm_stage_formula_on_right_padding(tiny_config):
    model = _reward_model(tiny_config).train()  # as in RM training (dropout is 0 in the config)
    ids, mask = _padded(right=True)
    new = score_rows(model, ids, mask)
    new.square().sum().backward()
    new_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    old = _old_rm_scores(model, ids, mask)
    old.square().sum().backward()
    assert torch.equal(new, old)
    for new_grad, param in zip(new_grads, model.parameters()):
        assert torch.equal(new_grad, param.grad)


def test_scoring_is_bitwise_ppo_formula_on_left_padding(tiny_config):
    model = _reward_model(tiny_config).eval()
    ids, mask = _padded(right=False)
    with torch.no_grad():
        assert torch.equal(score_rows(model, ids, mask), _old_ppo_scores(model, ids, mask))
        trunk, head = backbone_and_head(model)
        assert torch.equal(last_token_scores(trunk, head, ids, mask), score_rows(model, ids, mask))
    # left vs right padding (equal up to float32 rounding): tests/modules/test_reward_module.py


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
