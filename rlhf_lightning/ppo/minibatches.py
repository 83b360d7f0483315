"""The update's minibatches: one epoch's shuffled split, and epoch 0's drawn before step 3.

`group_minibatches` draws one epoch's minibatches (row indices; with k > 1 samples per prompt,
whole groups). `plan_first_micro_batch` draws epoch 0's before step 3 and names the rows of the
update's first micro-batch, so that step 3 can run the critic on them with autograd on and the
update train on that forward (`FirstMicroBatch`, `model.compute.reuse_critic_forward`): before the
first optimizer step the critic's parameters are the ones step 3 used, and nothing between step 3
and the update draws random numbers, so these are the minibatches the update would draw.
`check_minibatches` / `check_first_micro` are the one-line errors for settings or plans that do
not fit the rows.

References: Schulman et al. 2017 (PPO epochs over shuffled minibatches); Huang et al. 2024,
"The N+ Implementation Details of RLHF with PPO".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rlhf_lightning.ppo.config import UpdateConfig
from rlhf_lightning.ppo.rollout import micro_batches

__all__ = [
    "FirstMicroBatch",
    "plan_first_micro_batch",
    "group_minibatches",
    "check_minibatches",
    "check_first_micro",
]


@dataclass(frozen=True)
class FirstMicroBatch:
    """Epoch 0's minibatches, drawn before step 3, and step 3's critic values of the update's first
    micro-batch with their autograd graph (`compute.reuse_critic_forward`)."""

    minibatches: list[torch.Tensor]
    """Epoch 0's minibatches as Long row indices (`group_minibatches`)."""
    rows: torch.Tensor
    """Long[b] the rows of the first micro-batch (the first `update.micro_batch_size` rows of
    minibatch 0, in that order)."""
    values: torch.Tensor | None = None
    """Float[b, R] V(s_t) of `rows` (0 on padding) with the critic's autograd graph; None until
    step 3 has run (`ppo.logprobs.logprobs_values(..., graph_rows=rows)`)."""

    def with_values(self, values: torch.Tensor | None) -> FirstMicroBatch:
        """This plan with step 3's values."""
        return replace(self, values=values)


def plan_first_micro_batch(
    group: torch.Tensor | None, rows: int, upd: UpdateConfig, device
) -> FirstMicroBatch:
    """Draw epoch 0's minibatches now (as `ppo_update` would) and name its first micro-batch."""
    check_minibatches(group, rows, upd)
    minibatches = group_minibatches(group, rows, upd.num_minibatches, device)
    return FirstMicroBatch(minibatches, _first_micro_rows(minibatches, upd))


def _first_micro_rows(minibatches: list[torch.Tensor], upd: UpdateConfig) -> torch.Tensor:
    """Long[b] the rows of minibatch 0's first micro-batch, as the update takes them."""
    return minibatches[0][micro_batches(len(minibatches[0]), upd.micro_batch_size)[0]]


def group_minibatches(
    group: torch.Tensor | None, rows: int, num_minibatches: int, device
) -> list[torch.Tensor]:
    """One epoch's shuffled minibatches as Long row indices. Without groups: a permutation of the
    rows split into `num_minibatches` parts; with `group: Long[rows]`: the groups are permuted and
    split, and every minibatch holds all rows of its groups (adjacent, in group order)."""
    if group is None:
        order = torch.randperm(rows, device=device)
        return list(torch.tensor_split(order, num_minibatches))
    ids, dense = torch.unique(group, return_inverse=True)  # dense: [rows] in [0, G)
    order = torch.randperm(len(ids), device=device)  # groups in shuffled order
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(ids), device=device))
    by_group = torch.argsort(rank[dense] * rows + torch.arange(rows, device=device))  # [rows]
    per_group = torch.bincount(dense, minlength=len(ids))[order]  # rows of each shuffled group
    sizes = [int(part.sum()) for part in torch.tensor_split(per_group, num_minibatches)]
    return list(torch.split(by_group, sizes))


def check_minibatches(group: torch.Tensor | None, rows: int, upd: UpdateConfig) -> None:
    """One-line error when `update.num_minibatches` exceeds the rows (groups with k > 1)."""
    size = rows if group is None else int(group.unique().numel())
    if not 1 <= upd.num_minibatches <= size:
        raise ValueError(
            f"model.update.num_minibatches: {upd.num_minibatches} must be between 1 and the "
            f"rollout's {'rows' if group is None else 'prompts (groups)'} {size}"
        )


def check_first_micro(first: FirstMicroBatch, rows: int, upd: UpdateConfig) -> None:
    """One-line error when `first` was not planned for this experience and `upd`: its minibatches
    must cover the rows once and its rows be the first micro-batch of minibatch 0."""
    covered = torch.cat(first.minibatches).sort().values.cpu()
    if (
        len(first.minibatches) != upd.num_minibatches
        or not torch.equal(covered, torch.arange(rows))
        or not torch.equal(first.rows.cpu(), _first_micro_rows(first.minibatches, upd).cpu())
    ):
        raise ValueError(
            "first_micro was not planned for this update: use plan_first_micro_batch with the "
            "experience's rows and the same update config"
        )
