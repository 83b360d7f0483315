"""Pure reward-model losses and pair bookkeeping (no Lightning, no models).

A reward-model batch stacks every response of every prompt in one tensor of rewards
`r: [R]`, with `group: [R]` (prompt index within the batch) and `rank: [R]`
(0 = best within its group). From those, this module builds all ordered pairs
(better, worse) inside each group and evaluates

- Bradley–Terry: `-log σ(r_chosen - r_rejected - margin)` per pair (Bradley & Terry 1952;
  margin as in Llama 2, Touvron et al. 2023, §3.2.2);
- K-wise (InstructGPT, Ouyang et al. 2022, eq. 1): for a prompt ranked over K responses the
  loss is the mean of the Bradley–Terry loss over its C(K, 2) pairs, and each prompt counts
  as ONE batch element, so prompts with many responses do not dominate the gradient and the
  K responses are reused without the over-fitting of treating pairs as separate samples.
  With K = 2 it is exactly the pairwise Bradley–Terry loss;
- reward centering (Eisenstein et al. 2023, "Helping or Herding?", §3): a penalty on the
  squared mean reward of each prompt's responses that pins the reward's free offset near 0.

All functions are differentiable in the rewards and work for any mix of K per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RewardLossConfig:
    """The reward model's loss: K-wise Bradley–Terry with an optional margin and centering term."""

    use_margin: bool = True
    """Subtract each record's `margin` inside the sigmoid (`-log σ(r_c - r_r - margin)`);
    records without one use 0."""
    center_coef: float = 0.0
    """Weight (≥ 0) of the reward-centering term `mean_prompt(mean reward)²` that keeps rewards
    near 0; 0 disables it (Eisenstein et al. use 0.01)."""


@dataclass(frozen=True)
class Pairs:
    """Ordered (better, worse) row pairs inside each group of a stacked batch.

    `better`/`worse` index rows of the stacked batch; `group` is the prompt of each pair;
    `weight` is `1 / C(K_g, 2)` so that summing `weight * loss` per group gives the
    group's mean, and `num_groups` groups each count once.
    """

    better: torch.Tensor  # Long[P]
    worse: torch.Tensor  # Long[P]
    group: torch.Tensor  # Long[P]
    weight: torch.Tensor  # Float[P]
    num_groups: int


def ranked_pairs(group: torch.Tensor, rank: torch.Tensor, num_groups: int | None = None) -> Pairs:
    """All pairs (i, j) with `group[i] == group[j]` and `rank[i] < rank[j]`.

    Rows with equal rank in one group (ties) produce no pair. Raises `ValueError` when a
    group has fewer than 2 distinct ranks (no pair to learn from).
    """
    group = group.long()  # [R]
    rank = rank.long()  # [R]
    if num_groups is None:
        num_groups = int(group.max().item()) + 1 if group.numel() else 0
    same = group[:, None] == group[None, :]  # [R, R]
    ordered = rank[:, None] < rank[None, :]  # [R, R]
    better, worse = torch.nonzero(same & ordered, as_tuple=True)  # [P], [P]
    pair_group = group[better]  # [P]
    per_group = torch.bincount(pair_group, minlength=num_groups)  # [G]
    if num_groups and bool((per_group == 0).any()):
        empty = int(torch.nonzero(per_group == 0)[0].item())
        raise ValueError(
            f"group {empty} has no ranked pair (needs >= 2 responses of distinct rank)"
        )
    weight = 1.0 / per_group[pair_group].to(torch.float32)  # [P]
    return Pairs(better, worse, pair_group, weight, num_groups)


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of `-log σ(r_chosen - r_rejected - margin)` over pairs (`margin` 0 when None).

    Shapes: `r_chosen`, `r_rejected`, `margin`: `[P]` → scalar.
    """
    diff = r_chosen - r_rejected  # [P]
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    return -F.logsigmoid(diff).mean()


def kwise_ranking_loss(
    rewards: torch.Tensor,
    pairs: Pairs,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """InstructGPT K-wise loss: Bradley–Terry averaged over each prompt's C(K,2) pairs,
    then over prompts.

    `rewards: [R]` are the stacked scores, `pairs` from `ranked_pairs`, `margin: [G]`
    (per prompt; applied to every pair of that prompt, 0 when None). Returns a scalar.
    """
    diff = rewards[pairs.better] - rewards[pairs.worse]  # [P]
    if margin is not None:
        diff = diff - margin.to(diff.dtype)[pairs.group]  # [P]
    per_pair = -F.logsigmoid(diff)  # [P]
    return (per_pair * pairs.weight.to(per_pair.dtype)).sum() / pairs.num_groups


def group_mean(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of `values: [R]` per group → `[G]`."""
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device)  # [G]
    sums = sums.index_add(0, group, values)
    counts = torch.bincount(group, minlength=num_groups).to(values.dtype)  # [G]
    return sums / counts.clamp_min(1)


def reward_centering_loss(
    rewards: torch.Tensor, group: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """Mean over prompts of (mean reward of the prompt's responses)²; scalar.

    For a pair this is ¼ (r_chosen + r_rejected)², i.e. Eisenstein et al.'s regulariser up
    to the constant folded into its coefficient.
    """
    return group_mean(rewards, group, num_groups).pow(2).mean()


def reward_model_loss(
    rewards: torch.Tensor,
    group: torch.Tensor,
    rank: torch.Tensor,
    num_groups: int,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total RM loss for a stacked batch: K-wise ranking (= BT for K=2) + centering.

    Returns `(loss, parts)` where `parts` holds the detached `ranking` and `centering` terms
    and the `pairs` diff tensor `diff: [P]` (better − worse, before the margin) for metrics.
    """
    pairs = ranked_pairs(group, rank, num_groups)
    ranking = kwise_ranking_loss(rewards, pairs, margin)
    loss = ranking
    parts = {"ranking": ranking.detach()}
    if center_coef:
        centering = reward_centering_loss(rewards, group, num_groups)
        loss = loss + center_coef * centering
        parts["centering"] = centering.detach()
    parts["diff"] = (rewards[pairs.better] - rewards[pairs.worse]).detach()  # [P]
    parts["pair_group"] = pairs.group
    parts["better"] = pairs.better
    parts["worse"] = pairs.worse
    return loss, parts
