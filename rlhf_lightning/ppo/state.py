"""Small state helpers of the PPO module: config coercion, vocabulary check, RNG snapshots.

RNG snapshots hold only tensors and plain Python types, so checkpoints that contain them still
load with `torch.load(weights_only=True)` (Lightning's default for `--ckpt_path`).
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["coerce_config", "same_vocabulary", "get_rng_state", "set_rng_state"]


def coerce_config(cls, value):
    """A config dataclass from an instance, a dict (e.g. from a checkpoint) or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls(**value)
    return value


def same_vocabulary(policy_tok, reward_tok) -> bool:
    """True when every policy token id maps to the same token in the RM tokenizer."""
    n = len(policy_tok)
    if len(reward_tok) < n:
        return False
    ids = list(range(n))
    return policy_tok.convert_ids_to_tokens(ids) == reward_tok.convert_ids_to_tokens(ids)


def get_rng_state() -> dict:
    """torch / CUDA / python / numpy RNG states (tensors and plain types only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a `get_rng_state()` snapshot."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
