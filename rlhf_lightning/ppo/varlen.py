"""Padding-free forwards: the real tokens of B rows as one packed row, attention per sequence.

A padded `[query | response]` batch runs every matmul over B × T positions, padding included
(left padding of short prompts, right padding after an early EOS). Here the rows' real tokens are
concatenated into one row of N = Σ lengths tokens, position ids restarting at 0 for each
sequence, so every linear layer, norm and MLP runs on the N real tokens only. Attention alone
needs the sequences apart: the attention function registered here as `rlhf_varlen` (transformers'
`AttentionInterface`) runs, on CPU, one causal SDPA on each sequence's slice of the packed row
(views; the outputs joined by one `cat`; attention O(Σ T²)), and elsewhere — or where rows need a
mask (reward-model pair rows, a sliding window shorter than the rows) — gathers q, k, v into
right-padded rows [B, h, T_max, d], runs one SDPA over them (causal without a mask: the fastest
CPU and CUDA kernels) and scatters the real positions back (two gathers of N × H per layer,
attention O(B · T_max²)). A real query never sees a padded key (they all come after it), and the
outputs of padded queries are dropped, so hidden states and gradients equal the padded forward's
up to float32 rounding.

The trunk switches to `rlhf_varlen` only for the packed call (`config._attn_implementation`,
restored afterwards); any other call — `generate`, a padded forward — runs the model's own
attention. A gradient-checkpointed model would recompute its forward in backward after the
switch is undone, so such models stay padded (`gradient_checkpointing`). Works for decoder trunks that route attention through `ALL_ATTENTION_FUNCTIONS`
and take `position_ids` (Llama, Mistral, Qwen2/3, SmolLM, … in transformers ≥ 5);
`packing.packing_matches(..., varlen=True)` checks each model once and keeps padded rows for one
that does not match.

References: Dao 2023, "FlashAttention-2" (variable-length batches, `cu_seqlens`); Krell et al.
2021, "Efficient Sequence Packing without Cross-contamination"; transformers' attention
interface (`AttentionInterface`, `AttentionMaskInterface`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from rlhf_lightning.models.heads import scalar_head
from rlhf_lightning.models.masks import position_ids
from rlhf_lightning.ppo.packing import lm_trunk_and_head

__all__ = [
    "VARLEN",
    "VarlenLayout",
    "layout_of",
    "masked_segments",
    "varlen_attention",
    "varlen_call",
    "sliding_window_of",
    "gradient_checkpointing",
    "varlen_trunk",
    "varlen_lm",
    "varlen_values",
    "varlen_scores",
]

VARLEN = "rlhf_varlen"
"""The attention-implementation name registered with transformers."""
_LAYOUT_KEY = "rlhf_varlen_layout"
"""The model-call keyword that carries the `VarlenLayout` down to every attention layer."""


@dataclass(frozen=True)
class VarlenLayout:
    """Where each real token of B rows sits in the packed row and in right-padded rows."""

    to_rows: torch.Tensor
    """Long[B, T_max] index into the N packed tokens of row b's token j (clamped to the row's
    last token past its length: those slots are never attended and their outputs are dropped)."""
    to_packed: torch.Tensor
    """Long[N] index into the B · T_max right-padded slots of each packed token."""
    row_mask: torch.Tensor | None = None
    """Bool[B, 1, T_max, T_max] query slot may attend key slot, for rows whose attention is not
    plain causal (a reward-model pair row: the rejected response does not see the chosen one);
    None = causal. Padded slots see only themselves."""
    slot_positions: torch.Tensor | None = None
    """Long[B, T_max] position id of each slot, where it is not the slot index (rows with a
    `row_mask`: a second response continues its prompt's positions); the sliding window is
    measured in positions."""
    lengths: tuple[int, ...] = ()
    """The B segment lengths (Σ = N), for attention on the packed row's slices (CPU)."""


def _segments(lengths: torch.Tensor) -> tuple[VarlenLayout, torch.Tensor]:
    """(layout, first packed index Long[B]) of B consecutive segments of `lengths` Long[B]."""
    device = lengths.device
    starts = torch.cumsum(lengths, 0) - lengths  # [B]
    width = int(lengths.max())
    slot = torch.arange(width, device=device)  # [T_max]
    to_rows = starts[:, None] + torch.minimum(slot[None], (lengths - 1)[:, None])  # [B, T_max]
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)  # [N]
    to_packed = rows * width + (torch.arange(len(rows), device=device) - starts[rows])  # [N]
    return VarlenLayout(to_rows, to_packed, lengths=tuple(lengths.tolist())), starts


def layout_of(attention_mask: torch.Tensor) -> tuple[VarlenLayout, torch.Tensor, torch.Tensor]:
    """(layout, real Bool[B, T], flat start Long[B]) of the real tokens of `attention_mask`
    Long[B, T] (each row's real tokens contiguous, any padding side)."""
    real = attention_mask.bool()  # [B, T]
    layout, starts = _segments(real.sum(1))
    return layout, real, starts


def masked_segments(
    lengths: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor
) -> VarlenLayout:
    """The layout of a packed row made of consecutive segments (`lengths` Long[G]) whose tokens
    attend as `allowed` Bool[N, N] says, zero across segments, with position ids `positions`
    Long[N]: each segment's block becomes the `row_mask` of one right-padded row, so attention
    costs Σ T_g² instead of N²."""
    layout, _ = _segments(lengths)
    width = layout.to_rows.shape[1]
    slot = torch.arange(width, device=lengths.device)
    valid = slot[None] < lengths[:, None]  # [G, T_max]
    rows = layout.to_rows
    block = allowed[rows[:, :, None], rows[:, None, :]]  # [G, T_max, T_max]
    block = block & valid[:, :, None] & valid[:, None, :]
    block = block | torch.eye(width, dtype=torch.bool, device=lengths.device)  # padding: itself
    return VarlenLayout(
        layout.to_rows, layout.to_packed, block[:, None], positions[rows], layout.lengths
    )


def varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention per sequence of a packed row: query Float[1, h, N, d], key / value
    Float[1, h_kv, N, d] → (Float[1, N, h, d], None), the layout transformers' SDPA returns.
    Without a layout in `kwargs` (a call that is not packed) it is transformers' SDPA."""
    layout: VarlenLayout | None = kwargs.pop(_LAYOUT_KEY, None)
    if layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("padding-free attention does not support attention-logit soft-capping")
    sdpa = {
        "dropout_p": dropout if module.training else 0.0,
        "scale": scaling,
        "enable_gqa": key.shape[1] != query.shape[1],
    }
    mask = _with_window(layout, kwargs.get("sliding_window"), layout.to_rows.shape[1], query.device)
    if mask is None and query.device.type == "cpu" and layout.lengths:
        return _sliced_attention(query, key, value, layout.lengths, sdpa), None

    def rows(x: torch.Tensor) -> torch.Tensor:  # [1, h, N, d] → [B, h, T_max, d]
        return x[0][:, layout.to_rows].transpose(0, 1)

    q, k, v = rows(query), rows(key), rows(value)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, **sdpa)
    heads, dim = out.shape[1], out.shape[3]  # out: [B, h, T_max, d]
    packed = out.transpose(1, 2).reshape(-1, heads, dim)[layout.to_packed]  # [N, h, d]
    return packed[None], None


def _sliced_attention(query, key, value, lengths: tuple[int, ...], sdpa: dict) -> torch.Tensor:
    """Causal SDPA on each sequence's slice of the packed row: query Float[1, h, N, d], key /
    value Float[1, h_kv, N, d] → Float[1, N, h, d]. No gather into padded rows and no scatter
    back (the slices are views, the outputs one `cat`; in backward the slices' gradients one
    `cat` each), and no attention over padded slots. On 2 CPU threads, 4 rows of 96–160 tokens,
    9 / 3 heads of 64, per layer: forward 3.60 → 2.51 ms, forward + backward 11.73 → 8.28 ms; on
    GPUs the one batched call over padded rows is kept (B kernel launches per layer otherwise)."""
    parts = zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    outs = [F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa) for q, k, v in parts]
    return torch.cat([out.transpose(1, 2) for out in outs], 1)  # [1, N, h, d]


def _with_window(
    layout: VarlenLayout, window: int | None, width: int, device
) -> torch.Tensor | None:
    """The attention mask of the padded rows: `layout.row_mask` (None = causal), and where the
    model has a sliding window shorter than the rows, only keys fewer than `window` positions
    back (padded slots still see themselves)."""
    mask = layout.row_mask  # [B, 1, T_max, T_max] or None
    if window is None or width <= window:
        return mask
    slots = torch.arange(width, device=device)
    pos = layout.slot_positions if layout.slot_positions is not None else slots[None]  # [B|1, T]
    near = (pos[:, :, None] - pos[:, None, :]) < window  # [B|1, T_max, T_max]
    causal = slots[None, :] <= slots[:, None]  # [T_max, T_max]
    base = causal[None, None] if mask is None else mask
    return (base & near[:, None]) | torch.eye(width, dtype=torch.bool, device=device)


def _no_mask(*args, **kwargs) -> None:
    """The mask builder of `rlhf_varlen`: none (attention is causal per sequence)."""
    return None


AttentionInterface.register(VARLEN, varlen_attention)
AttentionMaskInterface.register(VARLEN, _no_mask)


def sliding_window_of(module: nn.Module) -> bool:
    """Whether `module` (any submodule's config) attends within a sliding window: a 4-D mask
    handed to transformers' attention replaces that window, so dense-mask packing must not be
    used for it (the per-sequence attention here applies the window itself)."""
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is None:
            continue
        layer_types = getattr(config, "layer_types", None) or ()
        windowed = getattr(config, "sliding_window", None) is not None and getattr(
            config, "use_sliding_window", True
        )
        if windowed or "sliding_attention" in layer_types:
            return True
    return False


def gradient_checkpointing(module: nn.Module) -> bool:
    """Whether any submodule of `module` recomputes its forward in backward (transformers'
    `gradient_checkpointing`). The recomputation runs after the packed call has restored the
    model's own attention, so such a model must not run padding-free while training."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())


@contextlib.contextmanager
def _attention_of(trunk: nn.Module, implementation: str):
    config = trunk.config
    saved = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = saved


def varlen_trunk(trunk: nn.Module, seqs, forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states of the real tokens of `seqs` (a `Sequences`: `input_ids`,
    `attention_mask` Long[B, T]) through `trunk` packed, and the flat packed index Long[B, T]
    of each padded position (padding → the row's nearest real token; mask it downstream).

    Returns (hidden Float[N, H], index Long[B, T]); `forward` = the (compiled) callable of
    `trunk` (default: the trunk itself).
    """
    mask = seqs.attention_mask  # [B, T]
    layout, real, starts = layout_of(mask)
    positions = position_ids(mask)  # [B, T] 0 at each row's first real token
    ids, pos = seqs.input_ids[real][None], positions[real][None]  # [1, N] each
    out = varlen_call(trunk, ids, pos, layout, forward)  # [N, H]
    index = starts[:, None] + positions  # [B, T]
    return out, index


def varlen_call(
    trunk: nn.Module, ids: torch.Tensor, positions: torch.Tensor, layout: VarlenLayout, forward=None
) -> torch.Tensor:
    """Last hidden states Float[N, H] of the packed row `ids` / `positions` Long[1, N] through
    `trunk` with per-row attention as `layout` says (`forward`: its compiled callable)."""
    if torch.is_grad_enabled() and trunk.training and gradient_checkpointing(trunk):
        raise RuntimeError(
            "padding-free forward of a gradient-checkpointed model: its recomputation in backward "
            "would not see the per-sequence attention (set model.compute.padding_free: false)"
        )
    with _attention_of(trunk, VARLEN):
        out = (trunk if forward is None else forward)(
            input_ids=ids, position_ids=positions, use_cache=False, **{_LAYOUT_KEY: layout}
        ).last_hidden_state  # [1, N, H]
    return out[0]


def _response_index(seqs, index: torch.Tensor) -> torch.Tensor:
    """Long[B, R] packed index of the position predicting each response token (the one a padded
    forward reads at column P − 1 + t); 0 where the token is padding."""
    query_width, steps = seqs.query_ids.shape[1], seqs.response_ids.shape[1]
    predict = index[:, query_width - 1 : query_width - 1 + steps]  # [B, R]
    return predict * seqs.response_mask.to(predict.dtype)


def varlen_lm(model: nn.Module, seqs, trunk_forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits Float[B, R, V], hidden Float[B, R, H]) of a causal LM at the positions predicting
    each response token of `seqs` (a `Sequences`), padding-free; the LM head runs on those B·R
    positions only."""
    trunk, head = lm_trunk_and_head(model)
    hidden, index = varlen_trunk(trunk, seqs, trunk_forward)  # [N, H], [B, T]
    at = hidden[_response_index(seqs, index)]  # [B, R, H]
    return head(at), at  # [B, R, V], [B, R, H]


def varlen_values(critic: nn.Module, seqs, trunk_forward=None) -> torch.Tensor:
    """Values Float[B, R] of a `CriticModel` (trunk + scalar head) at the response steps
    (unmasked), padding-free."""
    hidden, index = varlen_trunk(critic.trunk, seqs, trunk_forward)  # [N, H], [B, T]
    return scalar_head(critic.head, hidden[_response_index(seqs, index)])  # [B, R]


def varlen_scores(backbone: nn.Module, head: nn.Module, seqs, trunk_forward=None) -> torch.Tensor:
    """Sequence scores Float[B] of a classifier (backbone + scalar head) at each row's last real
    token, padding-free (the last column maps to it for either padding side)."""
    hidden, index = varlen_trunk(backbone, seqs, trunk_forward)  # [N, H], [B, T]
    return scalar_head(head, hidden[index[:, -1]])  # [B]
