"""Step 4 of a PPO iteration: per-token rewards, GAE(γ, λ), whitening (pure functions).

`estimate_advantages(scores, stats, rollout, cfg, kl_coef, ranks)` returns a frozen `Advantages`;
the estimator `update.advantage` is looked up in `ESTIMATORS`: `gae` (critic values) or one of the
critic-free `ppo.estimators.CRITIC_FREE` (GRPO, RLOO, REINFORCE++).

Everything here works on response tensors `[B, R]` (response token `t` of row `b`, right-padded),
with a mask `[B, R]` that is 1 on valid response tokens (up to and including EOS) and 0 on
padding after the response. Valid tokens of a row are contiguous from position 0.

References:
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (KL-penalised reward,
  sequence score added at the last token).
- Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation" (GAE(γ, λ)).
- Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (whitening over valid
  tokens, returns = advantages + values before whitening).

Under data parallelism the batch statistics (whitening, masked means and variances) take a
`ranks: CrossRank` and are computed over the valid tokens of every rank (`ppo.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlhf_lightning.models.masks import last_token_index
from rlhf_lightning.ppo.config import UpdateConfig, resolve_whitening
from rlhf_lightning.ppo.distributed import LOCAL, CrossRank
from rlhf_lightning.ppo.estimators import CRITIC_FREE, EstimatorInputs
from rlhf_lightning.ppo.masked import masked_mean, masked_moments, masked_var, whiten

if TYPE_CHECKING:
    from rlhf_lightning.ppo.logprobs import TokenStats
    from rlhf_lightning.ppo.rollout import Rollout
    from rlhf_lightning.ppo.scoring import Scores

__all__ = [
    "Advantages",
    "ESTIMATORS",
    "estimate_advantages",
    "masked_mean",
    "masked_moments",
    "masked_var",
    "whiten",
    "kl_penalised_rewards",
    "gae",
    "explained_variance",
]


def kl_penalised_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: `-kl_coef * kl` on every valid token, plus the sequence score at the last.

    Args:
        scores: Float[B] sequence-level reward (already normalised / clipped).
        kl: Float[B, R] per-token KL estimate between policy and reference (0 on padding).
        mask: [B, R] valid response tokens.
        kl_coef: the KL coefficient β (0 disables the penalty).
    Returns:
        Float[B, R] rewards, 0 on padding.
    """
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m  # [B, R]
    last = last_token_index(mask)  # [B]
    has_tokens = m.sum(-1) > 0  # [B]
    bonus = torch.where(has_tokens, scores.to(kl.dtype), torch.zeros_like(scores, dtype=kl.dtype))
    return rewards.scatter_add(1, last[:, None], bonus[:, None])  # [B, R]


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens.

    δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t,   A_t = δ_t + γ·λ·m_{t+1}·A_{t+1};
    the value after the last valid token is 0 (the episode ends there).

    Args:
        rewards: Float[B, R] per-token rewards (0 on padding).
        values: Float[B, R] critic values V(s_t) (ignored on padding).
        mask: [B, R] valid response tokens.
    Returns:
        (advantages Float[B, R], returns Float[B, R]) with returns = advantages + values; both 0 on
        padding. No gradient flows through them.
    """
    m = mask.to(values.dtype)
    rewards = rewards.detach() * m  # [B, R]
    values = values.detach() * m  # [B, R]
    steps = rewards.shape[-1]
    advantages = torch.zeros_like(values)  # [B, R]
    next_adv = torch.zeros_like(values[:, 0])  # [B]
    next_value = torch.zeros_like(values[:, 0])  # [B]
    for t in reversed(range(steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [B]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]  # [B]
        advantages[:, t] = next_adv
        next_value = values[:, t]  # already 0 on padding
    returns = (advantages + values) * m  # [B, R]
    return advantages, returns


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, ranks: CrossRank = LOCAL
) -> float:
    """1 − Var[returns − values] / Var[returns] over valid tokens of every rank (1 = perfect)."""
    var_ret = masked_var(returns, mask, ranks=ranks)
    var_err = masked_var(returns - values, mask, ranks=ranks)
    if var_ret.item() == 0:
        return float("nan")
    return float(1 - var_err / var_ret)


@dataclass(frozen=True)
class Advantages:
    """Step 4's output. B = prompts, R = response width; float32, 0 on padding."""

    rewards: torch.Tensor
    """Float[B, R] per-token rewards: −β·kl on every token, plus the shaped score at the last."""
    advantages: torch.Tensor
    """Float[B, R] advantages (whitened over every rank's valid tokens when configured)."""
    returns: torch.Tensor
    """Float[B, R] value targets (GAE advantages before whitening + values); the discounted
    returns for critic-free estimators (logged only)."""
    kl_coef: float
    """The β used in `rewards` (0 with `kl.mode: loss`)."""


def _gae_estimator(inputs: EstimatorInputs, cfg: UpdateConfig, ranks: CrossRank):
    """GAE(γ, λ) on the critic's values: (advantages, returns), Float[B, R] each."""
    if inputs.values is None:
        raise ValueError("update.advantage: gae needs critic values (critic.kind is none)")
    return gae(inputs.rewards, inputs.values, inputs.mask, cfg.gamma, cfg.lam)


ESTIMATORS: dict[str, Callable] = {"gae": _gae_estimator, **CRITIC_FREE}
"""Advantage estimators by name: `(EstimatorInputs, cfg, ranks) -> (advantages, returns)`."""


def estimate_advantages(
    scores: Scores,
    stats: TokenStats,
    rollout: Rollout,
    cfg: UpdateConfig,
    kl_coef: float,
    ranks: CrossRank,
) -> Advantages:
    """Step 4: KL-penalised per-token rewards (β = `kl_coef`) → `ESTIMATORS[cfg.advantage]` →
    whitening over the valid tokens of every data-parallel rank (`resolve_whitening`)."""
    mask = rollout.response_mask  # [B, R]
    rewards = kl_penalised_rewards(scores.shaped, stats.kl, mask, kl_coef)  # [B, R]
    inputs = EstimatorInputs(rewards, stats.values, mask, rollout.group_ids())
    adv, ret = ESTIMATORS[cfg.advantage](inputs, cfg, ranks)
    if resolve_whitening(cfg):
        adv = whiten(adv, mask, ranks=ranks)
    return Advantages(rewards, adv, ret, float(kl_coef))
