"""Critic-free advantage estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) as pure functions.

`CRITIC_FREE` maps the `update.advantage` names `grpo`, `rloo` and `reinforce_pp` to estimators
with the signature of `ppo.advantages.ESTIMATORS` (`(EstimatorInputs, cfg, ranks) -> (advantages,
returns)`). GRPO and RLOO read the sequence reward Σ_t r_t of the KL-penalised token rewards (the
shaped score minus β · sequence KL with `kl.mode: reward`; the shaped score alone with β = 0 or
`kl.mode: loss`); their returns, like REINFORCE++'s, are the discounted returns G_t (logged only:
there is no critic to fit them).

Layout. B = samples on this rank, R = response width (right padded). Each prompt is sampled k
times; `group: Long[B]` holds, for every sample, the id of the prompt it came from (any integers;
only equality matters). Every group has the same size k, and the samples of a group need not be
contiguous (`[0, 1, 0, 1]` is as valid as `[0, 0, 1, 1]`). All k samples of a prompt must be on
the same rank: group statistics are per rank, only REINFORCE++'s batch normalisation is global.
Sequence rewards are `Float[B]`; `broadcast_to_tokens` spreads a sequence advantage over the
valid response tokens (`mask: [B, R]`, 1 on valid tokens, contiguous from position 0).

Formulas, for sample i of group g (rewards r, group mean μ_g, k samples per group):
- GRPO:        A_i = (r_i − μ_g) / (σ_g + eps),  σ_g² = Σ_{j∈g} (r_j − μ_g)² / (k − 1)
  (unbiased std, as TRL's `GRPOTrainer` — `rewards.view(-1, num_generations).std(dim=1)`, whose
  default is Bessel-corrected — and verl's GRPO advantage use; TRL adds eps = 1e-4, verl 1e-6).
- Dr. GRPO:    A_i = r_i − μ_g  (`scale_by_std=False`: no division by σ_g).
- RLOO:        A_i = r_i − (1 / (k − 1)) Σ_{j∈g, j≠i} r_j  =  k / (k − 1) · (r_i − μ_g).
- REINFORCE++: G_t = Σ_{s≥t} γ^{s−t} r_s over the valid tokens of a row (r = per-token
  KL-penalised rewards, no critic), then A_t = (G_t − μ) / sqrt(σ² + eps) with μ, σ² over the
  valid tokens of every rank (`ppo.masked.masked_moments`, Bessel-corrected).
A group whose rewards are all equal gives exactly 0 for GRPO, Dr. GRPO and RLOO (never NaN);
with k = 1 GRPO / Dr. GRPO give 0 (σ is not computed), RLOO raises (it needs k ≥ 2).

References:
- Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
  Models" (GRPO, group-normalised outcome rewards).
- Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO: no
  division by the group std).
- Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
  Human Feedback in LLMs" (RLOO, leave-one-out baseline).
- Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models"
  (token-level KL penalty, discounted returns, global advantage normalisation).
- Hugging Face TRL, `trl/trainer/grpo_trainer.py` (`GRPOTrainer`: group mean / unbiased std).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_lightning.ppo.distributed import LOCAL, CrossRank
from rlhf_lightning.ppo.masked import masked_moments

__all__ = [
    "GroupLayout",
    "group_layout",
    "grpo_advantages",
    "rloo_advantages",
    "discounted_returns",
    "reinforce_pp_advantages",
    "broadcast_to_tokens",
    "group_reward_stats",
    "EstimatorInputs",
    "CRITIC_FREE",
]

_WHERE = "rlhf_lightning/ppo/estimators.py"


@dataclass(frozen=True)
class GroupLayout:
    """Which group each sample belongs to, as dense indices."""

    index: torch.Tensor
    """Long[B] dense group index in [0, num_groups) of every sample."""
    num_groups: int
    """G, the number of distinct prompts."""
    size: int
    """k, the number of samples of every group."""


def group_layout(group: torch.Tensor) -> GroupLayout:
    """Dense layout of `group: Long[B]` (prompt id per sample); every group must have k samples.

    Raises ValueError (one line) when `group` is not 1-D or the groups differ in size.
    """
    if group.dim() != 1:
        raise ValueError(f"{_WHERE}: group must be Long[B], got shape {tuple(group.shape)}")
    ids, index, counts = torch.unique(group, return_inverse=True, return_counts=True)
    if counts.numel() == 0:
        return GroupLayout(index, 0, 0)
    if counts.min() != counts.max():
        raise ValueError(
            f"{_WHERE}: every prompt needs the same number of samples "
            f"(generation.samples_per_prompt), got group sizes {sorted(set(counts.tolist()))}"
        )
    return GroupLayout(index, int(ids.numel()), int(counts[0]))


def _group_sums(rewards: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Float[G] sum of `rewards: Float[B]` over each group."""
    zeros = rewards.new_zeros(layout.num_groups)
    return zeros.index_add(0, layout.index, rewards)


def _tied(rewards: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Bool[B]: the sample's group has all rewards equal (its advantage is exactly 0)."""
    empty = rewards.new_empty(layout.num_groups)
    top = empty.scatter_reduce(0, layout.index, rewards, "amax", include_self=False)  # [G]
    low = empty.scatter_reduce(0, layout.index, rewards, "amin", include_self=False)  # [G]
    return (top == low)[layout.index]  # [B]


def grpo_advantages(
    rewards: torch.Tensor,
    group: torch.Tensor,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO group-relative advantages (Dr. GRPO with `scale_by_std=False`).

    Args:
        rewards: Float[B] sequence rewards.
        group: Long[B] prompt id of every sample (equal-size groups, any order).
        scale_by_std: divide by the group's unbiased std + `eps` (GRPO); False = Dr. GRPO.
        eps: added to the std (not the variance) before dividing.
    Returns:
        Float[B] advantages; exactly 0 for a group of equal rewards and for k = 1.
    """
    layout = group_layout(group)
    k = layout.size
    rewards = rewards.detach()
    tied = _tied(rewards, layout)  # [B]
    mean = (_group_sums(rewards, layout) / max(k, 1))[layout.index]  # [B]
    centred = torch.where(tied, torch.zeros_like(rewards), rewards - mean)  # [B]
    if not scale_by_std or k < 2:
        return centred
    var = _group_sums(centred**2, layout) / (k - 1)  # [G], Bessel-corrected
    std = var.sqrt()[layout.index] + eps  # [B]
    return centred / torch.where(tied, torch.ones_like(std), std)  # tied: 0 / 1, not 0 / 0


def rloo_advantages(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """RLOO: each reward minus the mean of the other k − 1 rewards of its group.

    Args:
        rewards: Float[B] sequence rewards.
        group: Long[B] prompt id of every sample (equal-size groups, any order).
    Returns:
        Float[B] advantages; exactly 0 for a group of equal rewards.
    Raises:
        ValueError when a group has fewer than 2 samples.
    """
    layout = group_layout(group)
    k = layout.size
    if k < 2 and rewards.numel() > 0:
        raise ValueError(
            f"{_WHERE}: RLOO needs at least 2 samples per prompt for its leave-one-out baseline, "
            f"got {k}; set generation.samples_per_prompt >= 2"
        )
    rewards = rewards.detach()
    others = _group_sums(rewards, layout)[layout.index] - rewards  # [B] Σ_{j≠i} r_j
    advantages = rewards - others / max(k - 1, 1)  # [B]
    return torch.where(_tied(rewards, layout), torch.zeros_like(rewards), advantages)


def discounted_returns(
    token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """G_t = r_t + γ·G_{t+1} over the valid tokens of each row; G after the last valid token is 0.

    Args:
        token_rewards: Float[B, R] per-token rewards (ignored on padding).
        mask: [B, R] valid response tokens.
    Returns:
        Float[B, R] returns, 0 on padding, no gradient.
    """
    m = mask.to(token_rewards.dtype)
    rewards = token_rewards.detach() * m  # [B, R]
    returns = torch.zeros_like(rewards)  # [B, R]
    running = torch.zeros_like(rewards[:, 0])  # [B]
    for t in reversed(range(rewards.shape[-1])):
        running = (rewards[:, t] + gamma * running) * m[:, t]  # [B]
        returns[:, t] = running
    return returns


def reinforce_pp_advantages(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    eps: float = 1e-8,
    ranks: CrossRank = LOCAL,
) -> torch.Tensor:
    """REINFORCE++: discounted returns of the KL-penalised token rewards, normalised over the
    valid tokens of every data-parallel rank: (G − μ) / sqrt(σ² + eps).

    Args:
        token_rewards: Float[B, R] per-token rewards (`advantages.kl_penalised_rewards`).
        mask: [B, R] valid response tokens.
        gamma: discount γ.
        eps: added to the (global, Bessel-corrected) variance.
        ranks: the data-parallel ranks (`LOCAL` in one process).
    Returns:
        Float[B, R] advantages, 0 on padding.
    """
    returns = discounted_returns(token_rewards, mask, gamma)  # [B, R]
    mean, var = masked_moments(returns, mask, ranks=ranks)
    return (returns - mean) * torch.rsqrt(var + eps) * mask.to(returns.dtype)


def broadcast_to_tokens(seq_advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float[B] sequence advantages → Float[B, R]: the same value on every valid token, 0 on
    padding (`mask: [B, R]`)."""
    return seq_advantages.detach()[:, None] * mask.to(seq_advantages.dtype)  # [B, R]


def group_reward_stats(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Float64[3]: (Σ over groups of the unbiased reward std, groups whose rewards are all equal,
    groups) of `rewards: Float[B]` grouped by `group: Long[B]` — sums, so that the caller can add
    them over ranks before dividing (std is 0 for k = 1)."""
    layout = group_layout(group)
    rewards = rewards.detach().double()
    if layout.num_groups == 0:
        return rewards.new_zeros(3)
    mean = _group_sums(rewards, layout) / layout.size  # [G]
    squares = _group_sums((rewards - mean[layout.index]) ** 2, layout)  # [G]
    std = (squares / max(layout.size - 1, 1)).sqrt()  # [G]
    first = torch.zeros(layout.num_groups, dtype=torch.long, device=rewards.device)
    first = first.scatter_(0, layout.index, torch.arange(len(rewards), device=rewards.device))
    tied = _tied(rewards, layout)[first]  # [G]
    return torch.stack([std.sum(), tied.double().sum(), rewards.new_tensor(layout.num_groups)])


@dataclass(frozen=True)
class EstimatorInputs:
    """What an advantage estimator reads. B = rows (prompts × samples), R = response width."""

    rewards: torch.Tensor
    """Float[B, R] KL-penalised token rewards (`ppo.advantages.kl_penalised_rewards`)."""
    values: torch.Tensor | None
    """Float[B, R] critic values; None without a critic."""
    mask: torch.Tensor
    """[B, R] valid response tokens."""
    group: torch.Tensor
    """Long[B] prompt index of every row (its group)."""


def _grpo(inputs: EstimatorInputs, cfg, ranks: CrossRank):
    """GRPO / Dr. GRPO (`update.scale_by_std`) on the sequence rewards Σ_t r_t."""
    seq = grpo_advantages(
        inputs.rewards.sum(-1), inputs.group, scale_by_std=cfg.scale_by_std
    )  # [B]
    returns = discounted_returns(inputs.rewards, inputs.mask, cfg.gamma)  # [B, R]
    return broadcast_to_tokens(seq, inputs.mask), returns


def _rloo(inputs: EstimatorInputs, cfg, ranks: CrossRank):
    """RLOO on the sequence rewards Σ_t r_t."""
    seq = rloo_advantages(inputs.rewards.sum(-1), inputs.group)  # [B]
    returns = discounted_returns(inputs.rewards, inputs.mask, cfg.gamma)  # [B, R]
    return broadcast_to_tokens(seq, inputs.mask), returns


def _reinforce_pp(inputs: EstimatorInputs, cfg, ranks: CrossRank):
    """REINFORCE++ on the token rewards (returns normalised over every rank's valid tokens)."""
    returns = discounted_returns(inputs.rewards, inputs.mask, cfg.gamma)  # [B, R]
    adv = reinforce_pp_advantages(inputs.rewards, inputs.mask, gamma=cfg.gamma, ranks=ranks)
    return adv, returns


CRITIC_FREE = {"grpo": _grpo, "rloo": _rloo, "reinforce_pp": _reinforce_pp}
"""The critic-free `update.advantage` estimators by name."""
