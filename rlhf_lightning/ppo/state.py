"""Small state helpers of the PPO module: vocabulary check, RNG snapshots.

RNG snapshots hold only tensors and plain Python types, so checkpoints that contain them still
load with `torch.load(weights_only=True)` (Lightning's default for `--ckpt_path`). A checkpoint
keeps one snapshot per data-parallel rank (`rng_per_rank`); `rank_rng_state` picks this rank's.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["same_vocabulary", "get_rng_state", "set_rng_state", "rank_rng_state"]


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


def rank_rng_state(ppo_state: dict, rank: int, world_size: int) -> dict:
    """This rank's RNG snapshot from a checkpoint's `ppo_state`; rank 0's (with a warning) when the
    checkpoint was written by another number of ranks or holds a single snapshot (older files)."""
    per_rank = ppo_state.get("rng_per_rank") or [ppo_state["rng"]]
    if len(per_rank) == world_size:
        return per_rank[rank]
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(
        f"checkpoint ppo_state: RNG states of {len(per_rank)} rank(s), resuming on {world_size}; "
        "rank 0 continues from its saved state and every other rank from a torch state derived "
        "from it and the rank (distinct sampling noise per rank), so sampling differs from the "
        "saved run"
    )
    state = dict(per_rank[0])
    if rank:
        seed = (int(state["torch"].long().sum()) * 1_000_003 + rank) % 2**63
        state["torch"] = torch.Generator().manual_seed(seed).get_state()
    return state
