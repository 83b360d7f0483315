"""The input of step 5: one `Experience` joins what steps 1, 3 and 4 produced, row by row.

`Experience.join(rollout, stats, advantages)` keeps exactly the tensors the update reads;
`select(index)` takes rows (a minibatch or micro-batch) and trims the prompt columns that are
padding in every selected row, as `Rollout.select` does. B = rows, P = prompt width, R = response
width; floats are float32 and 0 on padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_lightning.ppo.advantages import Advantages
from rlhf_lightning.ppo.logprobs import TokenStats
from rlhf_lightning.ppo.rollout import Rollout, Sequences

__all__ = ["Experience"]


@dataclass(frozen=True)
class Experience(Sequences):
    """What the PPO update trains on."""

    query_ids: torch.Tensor
    """Long[B, P] left-padded prompt ids."""
    query_mask: torch.Tensor
    """Long[B, P] 1 on prompt tokens."""
    response_ids: torch.Tensor
    """Long[B, R] sampled tokens, right-padded after the first EOS."""
    response_mask: torch.Tensor
    """Long[B, R] 1 up to and including EOS."""
    old_logprobs: torch.Tensor
    """Float[B, R] log π_old(a_t) (the ratio's denominator)."""
    ref_logprobs: torch.Tensor
    """Float[B, R] log π_ref(a_t) (for `kl.mode: loss`)."""
    old_values: torch.Tensor | None
    """Float[B, R] critic values at rollout time (for value clipping); None without a critic."""
    advantages: torch.Tensor
    """Float[B, R] (whitened) advantages."""
    returns: torch.Tensor
    """Float[B, R] value targets."""
    group: torch.Tensor | None = None
    """Long[B] prompt (group) of every row (`Rollout.group`); None = one sample per prompt."""

    @classmethod
    def join(cls, rollout: Rollout, stats: TokenStats, adv: Advantages) -> Experience:
        """The rows of steps 1, 3 and 4 side by side."""
        return cls(
            rollout.query_ids,
            rollout.query_mask,
            rollout.response_ids,
            rollout.response_mask,
            stats.logprobs,
            stats.ref_logprobs,
            stats.values,
            adv.advantages,
            adv.returns,
            rollout.group,
        )
