"""Shared-prompt packed scoring: each prompt computed once, no padding.

A right-padded reward-model batch wastes compute twice: the K responses of a prompt
repeat the same prompt tokens K times, and every row is padded to the longest one. On
Anthropic HH (`max_length=256`, 4 pairs) the real, de-duplicated tokens are under half of
the padded positions. This module packs a batch into ONE sequence `[1, N]`:

    prompt_0  response_0,0  response_0,1 ...  prompt_1  response_1,0 ...

with a 4-D boolean attention mask in which a response token sees its own prompt
(causally), the earlier tokens of its own response, and nothing else; position ids
restart so that a response continues its prompt's positions. Because attention is
causal, prompt states do not depend on the response, so every reward equals the padded
forward's up to float rounding, gradients included (tested). The shared part of a group
is the longest token prefix common to all its rows, keeping at least one token of each
row outside it. Each reward is read at the row's last token.

Needs a backbone that accepts `position_ids` and a prepared 4-D mask through its SDPA or
eager attention (Llama, Mistral, Qwen2/3, SmolLM, ... in transformers ≥ 4.48);
`packing_is_exact` checks a model once, and `RewardModule` falls back to padded scoring
when it fails. With one dense mask the attention cost is O(N²) in the packed length; by default
(`attention_per_group`) each group's tokens attend as one right-padded row with their own mask
(`ppo.varlen`), which costs Σ T_g² — on the HH benchmark batch (4 pairs, ≤ 256 tokens each) about a
quarter of the dense mask's attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlhf_lightning.models.heads import scalar_head
from rlhf_lightning.models.reward_export import backbone_and_head, score_rows


@dataclass
class PackingConfig:
    """Packed scoring of reward-model batches (each prompt computed once, no padding)."""

    enabled: bool = True
    """Score each batch as one packed sequence (exact; several times fewer token-FLOPs on chat
    data). Checked on the model at start; padded rows (with a warning) when the backbone does
    not support it."""
    max_tokens: int = 8192
    """Batches whose packed length exceeds this use padded rows (the packed mask is N x N)."""
    attention_per_group: bool = True
    """Attend per group (`ppo.varlen.masked_segments`: each prompt's tokens as one right-padded
    row with its own mask; Σ T_g² score entries instead of N², the linear layers still on the N
    packed tokens). Off for a gradient-checkpointed backbone (its recomputation would not see
    it); false = one dense N x N mask."""


def shared_prefix_lengths(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, group: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """Per group, the leading tokens common to all its right-padded rows. Returns `Long[G]`.

    Capped at (shortest row of the group − 1).
    """
    rows = torch.arange(len(group), device=group.device)  # [R]
    first = torch.full((num_groups,), len(group), dtype=torch.long, device=group.device)
    first = first.scatter_reduce(0, group, rows, "amin")  # [G]
    ref = first[group]  # [R]
    same = (
        (input_ids == input_ids[ref]) & attention_mask.bool() & attention_mask[ref].bool()
    )  # [R, T]
    common = same.long().cumprod(-1).sum(-1)  # [R]
    per_row = torch.minimum(common, attention_mask.sum(-1) - 1)  # [R]
    out = torch.full((num_groups,), input_ids.shape[1], dtype=torch.long, device=group.device)
    return out.scatter_reduce(0, group, per_row, "amin").clamp_min(0)  # [G]


def pack_groups(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, group: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack a stacked right-padded batch: prompts once, responses after them.

    Returns `ids: Long[1, N]`, `position_ids: Long[1, N]`, `allowed: Bool[1, 1, N, N]`
    (query may attend key) and `last: Long[R]` (packed index of each row's last token).
    """
    prefix = shared_prefix_lengths(input_ids, attention_mask, group, num_groups).tolist()
    lengths = attention_mask.sum(-1).tolist()
    ids_rows, grp, own, pos, last = [], [], [], [], [0] * len(lengths)
    rows_of: list[list[int]] = [[] for _ in range(num_groups)]
    for r, g in enumerate(group.tolist()):
        rows_of[g].append(r)
    cursor = 0
    for g, rows in enumerate(rows_of):
        p = prefix[g]
        ids_rows.append(input_ids[rows[0], :p])
        grp += [g] * p
        own += [-1] * p
        pos += list(range(p))
        cursor += p
        for r in rows:
            n = lengths[r] - p
            ids_rows.append(input_ids[r, p : lengths[r]])
            grp += [g] * n
            own += [r] * n
            pos += list(range(p, p + n))
            cursor += n
            last[r] = cursor - 1
    device = input_ids.device
    ids = torch.cat(ids_rows)[None]  # [1, N]
    grp_t = torch.tensor(grp, device=device)  # [N]
    own_t = torch.tensor(own, device=device)  # [N]
    n = ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()  # [N, N]
    visible = (own_t[None, :] == -1) | (own_t[None, :] == own_t[:, None])  # [N, N]
    allowed = causal & (grp_t[:, None] == grp_t[None, :]) & visible  # [N, N]
    positions = torch.tensor(pos, device=device)[None]  # [1, N]
    return ids, positions, allowed[None, None], torch.tensor(last, device=device)


def _attention_mask_for(backbone: nn.Module, allowed: torch.Tensor, dtype: torch.dtype):
    """The 4-D mask in the form the backbone's attention expects (bool for SDPA)."""
    impl = getattr(backbone.config, "_attn_implementation", "sdpa")
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    raise TypeError(f"packed scoring supports sdpa/eager attention, not {impl!r}")


def score_rows_packed(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    group: torch.Tensor,
    num_groups: int,
    per_group: bool = False,
) -> torch.Tensor:
    """Rewards `Float[R]` of a right-padded stacked batch from one packed forward (`per_group`:
    attention per group, `ppo.varlen.masked_segments`; else one dense [N, N] mask)."""
    from rlhf_lightning.ppo import varlen

    backbone, head = backbone_and_head(model)
    ids, positions, allowed, last = pack_groups(input_ids, attention_mask, group, num_groups)
    if per_group:
        lengths = _group_lengths(allowed.shape[-1], positions[0])  # [G]
        layout = varlen.masked_segments(lengths, allowed[0, 0], positions[0])
        return scalar_head(head, varlen.varlen_call(backbone, ids, positions, layout)[last])
    dtype = next(backbone.parameters()).dtype
    mask = _attention_mask_for(backbone, allowed, dtype)  # [1, 1, N, N]
    hidden = backbone(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
    ).last_hidden_state  # [1, N, H]
    return scalar_head(head, hidden[0, last])  # [R]


def _group_lengths(n: int, positions: torch.Tensor) -> torch.Tensor:
    """Tokens per group Long[G] of a packed row of `n` tokens: a group starts where the position
    ids `positions` Long[N] restart at 0 (its shared prompt's first token)."""
    starts = torch.nonzero(positions == 0).flatten()  # [G]
    ends = torch.cat([starts[1:], torch.tensor([n], device=starts.device)])
    return ends - starts


@torch.no_grad()
def packing_is_exact(
    model: nn.Module, vocab_size: int, atol: float = 1e-4, per_group: bool = False
) -> bool:
    """True when packed (`per_group`: attention per group) and padded scoring agree on a small
    random batch for `model`."""
    from rlhf_lightning.ppo.varlen import sliding_window_of

    if not per_group and sliding_window_of(model):
        return False  # a 4-D mask would replace the model's sliding window
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (3, 7), generator=gen)  # [3, 7]
    ids[1, :3] = ids[0, :3]  # rows 0 and 1 share a 3-token prompt
    ids, group = ids.to(device), torch.tensor([0, 0, 1], device=device)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5], device=device)  # [3, 7]
    was_training = model.training
    model.eval()
    try:
        packed = score_rows_packed(model, ids, mask, group, 2, per_group=per_group)
        padded = score_rows(model, ids, mask)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError):
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(packed, padded, atol=atol, rtol=1e-3))
