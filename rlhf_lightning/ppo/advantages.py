"""Step 4 of a PPO iteration: per-token rewards, GAE(γ, λ), whitening (pure functions).

`estimate_advantages(scores, stats, rollout, cfg, kl_coef, ranks)` returns a frozen `Advantages`;
the estimator is looked up in `ESTIMATORS` (only `"gae"`, which needs critic values, for now —
the slot where critic-free estimators such as GRPO / RLOO / REINFORCE++ go).

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
from rlhf_lightning.ppo.config import UpdateConfig
from rlhf_lightning.ppo.distributed import LOCAL, CrossRank

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


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, ranks: CrossRank = LOCAL
) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is true (all dims when `dim` is None).

    With `dim=None` the mean is over the valid positions of every rank (`ranks`, see
    `ppo.distributed`): sums and counts are all-reduced before dividing.
    """
    m = mask.to(x.dtype)
    if dim is None:
        total, count = ranks.sum(torch.stack([(x * m).sum(), m.sum()]))
        return total / count.clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, ranks: CrossRank = LOCAL
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of `x` over the valid positions of every rank (Bessel-corrected when
    `unbiased`): the global mean first, then the global sum of squared deviations from it."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, mask, ranks=ranks)
    squares, n = ranks.sum(torch.stack([(((x - mean) ** 2) * m).sum(), m.sum()]))
    var = squares / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return mean, var


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, ranks: CrossRank = LOCAL
) -> torch.Tensor:
    """Variance of `x` over the valid positions (of every rank; Bessel-corrected when `unbiased`)."""
    return masked_moments(x, mask, unbiased, ranks)[1]


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    ranks: CrossRank = LOCAL,
) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean when `shift_mean`) over valid tokens.

    Statistics come from the valid positions only, of every data-parallel rank (`ranks`), so a
    batch split over ranks is whitened as the whole batch would be; padded positions return 0.
    """
    m = mask.to(x.dtype)
    mean, var = masked_moments(x, mask, ranks=ranks)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


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
    """Float[B, R] value targets (GAE advantages before whitening + values)."""
    kl_coef: float
    """The β used in `rewards` (0 with `kl.mode: loss`)."""


def _gae_estimator(
    rewards: torch.Tensor, stats: TokenStats, mask: torch.Tensor, cfg: UpdateConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(γ, λ) on the critic's values: (advantages, returns), Float[B, R] each."""
    return gae(rewards, stats.values, mask, cfg.gamma, cfg.lam)


ESTIMATORS: dict[str, Callable] = {"gae": _gae_estimator}
"""Advantage estimators by name: `(rewards, token_stats, mask, cfg) -> (advantages, returns)`."""


def estimate_advantages(
    scores: Scores,
    stats: TokenStats,
    rollout: Rollout,
    cfg: UpdateConfig,
    kl_coef: float,
    ranks: CrossRank,
    estimator: str = "gae",
) -> Advantages:
    """Step 4: KL-penalised per-token rewards (β = `kl_coef`) → `ESTIMATORS[estimator]` →
    whitening over the valid tokens of every data-parallel rank (`ranks`)."""
    mask = rollout.response_mask  # [B, R]
    rewards = kl_penalised_rewards(scores.shaped, stats.kl, mask, kl_coef)  # [B, R]
    adv, ret = ESTIMATORS[estimator](rewards, stats, mask, cfg)
    if cfg.whiten_advantages:
        adv = whiten(adv, mask, ranks=ranks)
    return Advantages(rewards, adv, ret, float(kl_coef))
