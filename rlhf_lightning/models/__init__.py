"""Model loading (hub id, local dir, GGUF, config dict; dtype, checkpointing, LoRA), heads,
sequence-layout rules (`masks`) and reward-model scoring/export (`reward_export`)."""

from .heads import ValueHead, gather_last, last_token_scores
from .loading import (
    ModelSpec,
    ModelSpecError,
    export_pretrained,
    is_peft,
    load_causal_lm,
    load_sequence_classifier,
    unwrap_peft,
)
from .masks import last_token_index, position_ids, response_mask

__all__ = [
    "ModelSpec",
    "ModelSpecError",
    "ValueHead",
    "export_pretrained",
    "gather_last",
    "is_peft",
    "last_token_index",
    "last_token_scores",
    "load_causal_lm",
    "load_sequence_classifier",
    "position_ids",
    "response_mask",
    "unwrap_peft",
]
