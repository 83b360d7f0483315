"""Group packing: the prompt of a group computed once for its k samples (exact).

With `generation.samples_per_prompt` k > 1 the k rows of a group repeat one prompt: a padded
forward computes it k times and pads every row to the longest `[query | response]`. Here the rows
of a (micro-)batch are packed group by group, one packed row per group:

    [shared prefix | own tokens of sample 1 | … | own tokens of sample k]   (right padded to L)

with a 4-D boolean mask in which a token sees the shared prefix and the earlier tokens of its own
sample, causally, and nothing else; position ids continue the prefix's positions in every sample.
Attention is causal, so every hidden state equals the padded forward's up to float rounding, and
so do gradients (prompt states receive the summed gradient of the k samples, as in the padded
forward). The shared prefix is the longest token prefix common to all rows of the group (the
prompt, plus any identical first response tokens), keeping ≥ 1 own token per row — the rule of
`modules.reward_packing`, which packs reward-model training batches the same way.

Outputs are read back per original row: `PackedRows.predict` Long[B, R] is the packed position
whose output predicts response token t (the one a padded forward reads at column P − 1 + t) and
`PackedRows.last` Long[B] the row's last real token (rewards). The LM head runs only at the
`predict` positions (`packed_lm`).

Cost, for the benchmark's GRPO k = 4 (prompts 64–128 tokens, 32 new): ≈ 96 + 4·32 = 224 tokens
per group instead of 4 × 160 = 640, with attention O(L²) per packed row (224² ≈ 50 k score
entries per group vs 4 × 160² ≈ 102 k padded). With k = 1 nothing is shared: a dense mask over
all tokens would trade padding for O(N²) attention, so those rows run padding-free instead
(`ppo.varlen`: one packed row, attention per sequence).

Needs a trunk that takes `position_ids` and a prepared 4-D mask through SDPA or eager attention
(Llama, Mistral, Qwen2/3, SmolLM, … in transformers ≥ 4.48), and logits = `lm_head(hidden)`
(no final soft-capping); `ppo.compile.configure_forwards` checks every model once with
`packing_matches` and keeps padded rows for one that does not match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlhf_lightning.models.heads import scalar_head
from rlhf_lightning.models.loading import unwrap_peft
from rlhf_lightning.models.masks import position_ids

__all__ = [
    "PackedRows",
    "pack_rows",
    "shares_prefixes",
    "packed_hidden",
    "lm_trunk_and_head",
    "packed_lm",
    "packed_values",
    "packed_scores",
    "packing_matches",
]


@dataclass(frozen=True)
class PackedRows:
    """B rows packed into G packed rows of width L (one per group)."""

    input_ids: torch.Tensor
    """Long[G, L] packed tokens (0 on padding)."""
    position_ids: torch.Tensor
    """Long[G, L] each token's position in its own `[query | response]` row."""
    allowed: torch.Tensor
    """Bool[G, 1, L, L] query position may attend key position (padding sees only itself)."""
    predict: torch.Tensor
    """Long[B, R] flat index into G·L of the position predicting response token t (0 where t is
    padding)."""
    last: torch.Tensor
    """Long[B] flat index into G·L of each row's last real token."""


def shares_prefixes(group: torch.Tensor | None) -> bool:
    """Whether any two rows of `group` (Long[B] or None) belong to the same group."""
    return group is not None and int(torch.unique(group).numel()) < len(group)


def _common_prefix(rows: list[list[int]]) -> int:
    """Leading tokens common to every row, capped at (shortest row − 1)."""
    cap = min(len(r) for r in rows) - 1
    length = 0
    while length < cap and all(r[length] == rows[0][length] for r in rows[1:]):
        length += 1
    return length


def _group_layout(tokens: list[list[int]], members: list[int]):
    """(ids, positions, segment per token, own start per member) of one packed group row.
    Segment −1 = shared prefix, else the member's row index."""
    prefix = _common_prefix([tokens[r] for r in members])
    ids, pos, seg = tokens[members[0]][:prefix], list(range(prefix)), [-1] * prefix
    starts = {}
    for r in members:
        starts[r] = len(ids)
        own = tokens[r][prefix:]
        ids, pos, seg = (
            ids + own,
            pos + list(range(prefix, prefix + len(own))),
            seg + [r] * len(own),
        )
    return ids, pos, seg, starts, prefix


def _allowed(segments: torch.Tensor) -> torch.Tensor:
    """Bool[G, 1, L, L] from segments Long[G, L] (−1 prefix, −2 padding, else own row)."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()  # [L, L]
    key, query = segments[:, None, :], segments[:, :, None]  # [G, 1, L], [G, L, 1]
    visible = ((key == -1) | (key == query)) & (key != -2) & (query != -2)  # [G, L, L]
    diagonal = torch.eye(width, dtype=torch.bool, device=segments.device)  # padding sees itself
    return ((causal & visible) | diagonal)[:, None]  # [G, 1, L, L]


def pack_rows(seqs, group: torch.Tensor) -> PackedRows:
    """Pack `[query | response]` rows (a `Sequences`: `Rollout`, `Experience`, a micro-batch of
    either) by `group` (Long[B]; rows of one group share their prompt)."""
    attention = seqs.attention_mask  # [B, T]
    tokens = [
        [t for t, m in zip(row, keep) if m]
        for row, keep in zip(seqs.input_ids.tolist(), attention.tolist())
    ]
    members: dict[int, list[int]] = {}
    for row, g in enumerate(group.tolist()):
        members.setdefault(g, []).append(row)
    layouts = [_group_layout(tokens, rows) for rows in members.values()]
    width = max(len(layout[0]) for layout in layouts)
    device = attention.device
    ids = torch.zeros(len(layouts), width, dtype=torch.long, device=device)  # [G, L]
    pos = torch.zeros_like(ids)  # [G, L]
    seg = torch.full_like(ids, -2)  # [G, L]
    col_of = torch.zeros(len(tokens), max(map(len, tokens)), dtype=torch.long)  # [B, T_real]
    for g, (row_ids, row_pos, row_seg, starts, prefix) in enumerate(layouts):
        n = len(row_ids)
        ids[g, :n] = torch.tensor(row_ids, device=device)
        pos[g, :n] = torch.tensor(row_pos, device=device)
        seg[g, :n] = torch.tensor(row_seg, device=device)
        for r, start in starts.items():
            real = torch.arange(len(tokens[r]))  # [n_r] position of each real token
            cols = torch.where(real < prefix, real, start + real - prefix)
            col_of[r, : len(tokens[r])] = g * width + cols
    return PackedRows(ids, pos, _allowed(seg), *_read_indices(seqs, col_of.to(device), tokens))


def _read_indices(seqs, col_of: torch.Tensor, tokens: list[list[int]]):
    """(predict Long[B, R], last Long[B]) from the flat packed index of every real token."""
    query_width, steps = seqs.query_ids.shape[1], seqs.response_ids.shape[1]
    real = position_ids(seqs.attention_mask)[:, query_width - 1 : query_width - 1 + steps]  # [B, R]
    predict = col_of.gather(1, real)  # [B, R] (padding → some valid index; masked downstream)
    predict = predict * seqs.response_mask.to(predict.dtype)  # [B, R] 0 on padding
    lengths = torch.tensor([len(t) - 1 for t in tokens], device=col_of.device)  # [B]
    last = col_of.gather(1, lengths[:, None])[:, 0]  # [B]
    return predict, last


def _mask_for(trunk: nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """The 4-D mask in the form the trunk's attention expects (bool for SDPA, additive for eager)."""
    impl = getattr(trunk.config, "_attn_implementation", "sdpa") or "sdpa"
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        dtype = next(trunk.parameters()).dtype
        zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return zeros.masked_fill(~allowed, torch.finfo(dtype).min)
    raise TypeError(f"packed forwards support sdpa/eager attention, not {impl!r}")


def packed_hidden(trunk: nn.Module, packed: PackedRows, forward=None) -> torch.Tensor:
    """Last hidden states Float[G·L, H] of the packed rows; `forward` = the (compiled) callable of
    `trunk` (default: the trunk itself)."""
    out = (trunk if forward is None else forward)(
        input_ids=packed.input_ids,
        attention_mask=_mask_for(trunk, packed.allowed),
        position_ids=packed.position_ids,
        use_cache=False,
    ).last_hidden_state  # [G, L, H]
    return out.reshape(-1, out.shape[-1])  # [G·L, H]


def lm_trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder trunk, LM head) of a causal LM (LoRA layers stay active inside both)."""
    inner = unwrap_peft(model, merge=False)
    return inner.base_model, inner.get_output_embeddings()


def packed_lm(model: nn.Module, packed: PackedRows, trunk_forward=None):
    """(logits Float[B, R, V], hidden Float[B, R, H]) at the positions predicting each response
    token; the LM head runs on those B·R positions only."""
    trunk, head = lm_trunk_and_head(model)
    hidden = packed_hidden(trunk, packed, trunk_forward)[packed.predict]  # [B, R, H]
    return head(hidden), hidden  # [B, R, V], [B, R, H]


def packed_values(critic: nn.Module, packed: PackedRows, trunk_forward=None) -> torch.Tensor:
    """Values Float[B, R] of a `CriticModel` (trunk + head) at the response steps (unmasked)."""
    hidden = packed_hidden(critic.trunk, packed, trunk_forward)[packed.predict]  # [B, R, H]
    return scalar_head(critic.head, hidden)  # [B, R]


def packed_scores(
    backbone: nn.Module, head: nn.Module, packed: PackedRows, trunk_forward=None
) -> torch.Tensor:
    """Sequence scores Float[B] of a classifier (backbone + scalar head) at each row's last token."""
    hidden = packed_hidden(backbone, packed, trunk_forward)[packed.last]  # [B, H]
    return scalar_head(head, hidden)  # [B]


def _probe(vocab_size: int, device) -> tuple[object, torch.Tensor]:
    """A 3-row `Rollout` (rows 0 and 1 share a prompt; left and right padding) and its groups."""
    from rlhf_lightning.ppo.rollout import Rollout

    gen = torch.Generator().manual_seed(0)
    query = torch.randint(0, vocab_size, (3, 4), generator=gen)  # [3, 4]
    query[1] = query[0]
    query_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])  # [3, 4]
    response = torch.randint(0, vocab_size, (3, 3), generator=gen)  # [3, 3]
    response_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])  # [3, 3]
    tensors = [t.to(device) for t in (query, query_mask, response, response_mask)]
    return Rollout(*tensors, ["", "", ""]), torch.tensor([0, 0, 1], device=device)


def _padded_probe(kind: str, model: nn.Module, rollout) -> torch.Tensor:
    """What the padded forward gives on the probe: LM logits / critic values at the response steps
    [3, 3, ·], or classifier scores [3]."""
    mask = rollout.attention_mask
    steps = rollout.response_ids.shape[1]
    if kind == "lm":
        out = model(
            input_ids=rollout.input_ids,
            attention_mask=mask,
            position_ids=position_ids(mask),
            logits_to_keep=steps + 1,
            use_cache=False,
        )
        return out.logits[:, :-1]
    if kind == "critic":
        return model(rollout.input_ids, mask)[:, -steps - 1 : -1]
    from rlhf_lightning.models.reward_export import score_rows

    return score_rows(model, rollout.input_ids, mask)


def _vocab_size(model: nn.Module) -> int:
    """The vocabulary size in the first config found in `model`'s modules."""
    for module in model.modules():
        size = getattr(getattr(module, "config", None), "vocab_size", None)
        if size:
            return int(size)
    return 2


@torch.no_grad()
def packing_matches(kind: str, model: nn.Module, atol: float = 1e-4, varlen: bool = False) -> bool:
    """True when the packed forward of `model` (`kind`: `lm`, `critic` or `classifier`) equals
    its padded forward on a small probe batch (within `atol` + 1e-3 relative): group packing, or
    with `varlen` the padding-free forward of `ppo.varlen`."""
    from rlhf_lightning.models.reward_export import backbone_and_head
    from rlhf_lightning.ppo import varlen as padding_free

    if not varlen and padding_free.sliding_window_of(model):
        return False  # the 4-D mask would replace the model's sliding window
    param = next(model.parameters())
    rollout, group = _probe(min(_vocab_size(model), 1000), param.device)
    was_training = model.training
    model.eval()
    try:
        if varlen:
            readers = {
                "lm": lambda: padding_free.varlen_lm(model, rollout)[0],
                "critic": lambda: padding_free.varlen_values(model, rollout),
                "classifier": lambda: padding_free.varlen_scores(
                    *backbone_and_head(model), rollout
                ),
            }
        else:
            packed = pack_rows(rollout, group)
            readers = {
                "lm": lambda: packed_lm(model, packed)[0],
                "critic": lambda: packed_values(model, packed),
                "classifier": lambda: packed_scores(*backbone_and_head(model), packed),
            }
        got = readers[kind]()
        want = _padded_probe(kind, model, rollout)
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError, KeyError):
        return False
    finally:
        model.train(was_training)
    valid = rollout.response_mask.bool() if kind != "classifier" else torch.ones(3, dtype=bool)
    return bool(torch.allclose(got[valid].float(), want[valid].float(), atol=atol, rtol=1e-3))
