"""Model loading (hub id, local dir, GGUF, config dict; dtype, checkpointing, LoRA) and heads."""

from .heads import ValueHead, gather_last, last_token_index
from .loading import (
    ModelSpec,
    ModelSpecError,
    export_pretrained,
    load_causal_lm,
    load_sequence_classifier,
)

__all__ = [
    "ModelSpec",
    "ModelSpecError",
    "ValueHead",
    "export_pretrained",
    "gather_last",
    "last_token_index",
    "load_causal_lm",
    "load_sequence_classifier",
]
