"""PPO loss terms, each normalised by GLOBAL minibatch counts, plus a stats accumulator.

Every loss is `sum over this micro-batch's valid tokens / n_tokens`, where `n_tokens` is the number
of valid tokens in the whole minibatch (all its micro-batches). Summing the micro-batch losses (or
accumulating their gradients) therefore gives exactly the minibatch token-mean, whatever the
micro-batch size. The same holds for the returned statistics, which are token-means computed the
same way (add them up over the micro-batches of a minibatch).

Other loss aggregations (`update.loss_aggregation`) pass per-token `weights` (`token_weights`)
that replace `mask / n_tokens` in the losses (statistics stay token-means):
- `token_mean`:          w = m / N_tokens                      (default; Σ w = 1)
- `seq_mean_token_mean`: w = m / (|y_i| · N_seqs)               (mean per response, then over
  responses — the original GRPO, Shao et al. 2024)
- `token_sum_norm`:      w = m / (N_seqs · max_new_tokens)      (a constant normaliser — Dr. GRPO,
  Liu et al. 2025)
with N_tokens / N_seqs the minibatch's valid tokens / responses, so all three are invariant to the
micro-batch size.

References:
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped surrogate, value loss,
  entropy bonus).
- Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL" (dual-clip for A < 0).
- Ouyang et al. 2022, "Training language models to follow instructions" (PPO-ptx term).
- Schulman 2020, "Approximating KL Divergence" (the k3 estimator used for approx-KL).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from rlhf_lightning.ppo.distributed import LOCAL, CrossRank

__all__ = [
    "policy_loss",
    "value_loss",
    "entropy_bonus",
    "ptx_loss",
    "kl_loss",
    "PPOStats",
    "token_weights",
]


def _check_count(n_tokens: int | float | torch.Tensor) -> float:
    n = float(n_tokens)
    if n <= 0:
        raise ValueError(f"n_tokens must be > 0 (the global count of valid tokens), got {n}")
    return n


def token_weights(
    mask: torch.Tensor, aggregation: str, n_tokens: float, n_seqs: float, max_new_tokens: int
) -> torch.Tensor:
    """Float64[b, R] per-token loss weights of one micro-batch (`mask: [b, R]`) for
    `update.loss_aggregation`; `n_tokens` / `n_seqs` count the whole minibatch. Float64, so that
    a float64 run is exact; the losses cast them to their own dtype (rounding each weight once)."""
    m = mask.to(torch.float64)
    if aggregation == "token_mean":
        return m / _check_count(n_tokens)
    if aggregation == "seq_mean_token_mean":
        lengths = m.sum(-1, keepdim=True).clamp(min=1)  # [b, 1]
        return m / lengths / _check_count(n_seqs)
    if aggregation == "token_sum_norm":
        return m / (_check_count(n_seqs) * max_new_tokens)
    raise ValueError(f"model.update.loss_aggregation: unknown {aggregation!r}")


def _weighted(per_token: torch.Tensor, m: torch.Tensor, n: float, weights) -> torch.Tensor:
    """Σ per_token · weights, or Σ per_token · m / n without weights."""
    if weights is None:
        return (per_token * m).sum() / n
    return (per_token * weights.to(per_token.dtype)).sum()


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    n_tokens: int | float | torch.Tensor,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss `max(−A·r, −A·clip(r, 1−ε, 1+ε))`, summed over valid tokens / n_tokens.

    Args:
        logprobs: Float[B, R] log π_θ(a_t) (with grad).
        old_logprobs: Float[B, R] log π_old(a_t) from the rollout.
        advantages: Float[B, R] (whitened) advantages.
        mask: [B, R] valid response tokens.
        n_tokens: valid tokens in the whole minibatch.
        clip_eps: ε of the ratio clip.
        dual_clip: c > 1 caps the loss of negative-advantage tokens at −c·A (None disables).
        weights: Float[B, R] per-token loss weights (`token_weights`); None = mask / n_tokens.
    Returns:
        (loss, stats) — stats are detached token-means (over n_tokens): `approxkl` (k3 estimate of
        KL(π_old ‖ π_θ)), `clipfrac`, `ratio_mean`, and `dual_clipfrac` when dual-clip is on.
    """
    n = _check_count(n_tokens)
    m = mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs) * m  # [B, R]
    ratio = torch.exp(log_ratio)  # [B, R]
    unclipped = -advantages * ratio  # [B, R]
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # [B, R]
    per_token = torch.maximum(unclipped, clipped)  # [B, R]
    stats: dict[str, torch.Tensor] = {}
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        cap = -dual_clip * advantages  # [B, R]
        capped = (advantages < 0) & (per_token > cap)  # [B, R]
        per_token = torch.where(advantages < 0, torch.minimum(per_token, cap), per_token)
        stats["dual_clipfrac"] = (capped.to(m.dtype) * m).sum().detach() / n
    loss = _weighted(per_token, m, n, weights)
    with torch.no_grad():
        stats["approxkl"] = ((ratio - 1.0 - log_ratio) * m).sum() / n
        stats["clipfrac"] = ((clipped > unclipped).to(m.dtype) * m).sum() / n
        stats["ratio_mean"] = (ratio * m).sum() / n
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    n_tokens: int | float | torch.Tensor,
    clip_range: float | None = 0.2,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss `½·max((V−R)², (V_old + clip(V−V_old, ±c) − R)²)` over valid tokens / n_tokens.

    Args:
        values: Float[B, R] current critic values (with grad).
        old_values: Float[B, R] values from the rollout.
        returns: Float[B, R] GAE returns.
        mask: [B, R] valid response tokens.
        n_tokens: valid tokens in the whole minibatch.
        clip_range: c; None disables value clipping (plain ½·(V−R)²).
        weights: Float[B, R] per-token loss weights (`token_weights`); None = mask / n_tokens.
    Returns:
        (loss, stats) — `clipfrac` (fraction where the clipped branch is larger), `mean` (mean value).
    """
    n = _check_count(n_tokens)
    m = mask.to(values.dtype)
    loss_unclipped = (values - returns) ** 2  # [B, R]
    if clip_range is None:
        per_token = loss_unclipped
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)  # [B, R]
        loss_clipped = (v_clipped - returns) ** 2  # [B, R]
        per_token = torch.maximum(loss_unclipped, loss_clipped)  # [B, R]
        clipfrac = ((loss_clipped > loss_unclipped).to(m.dtype) * m).sum().detach() / n
    loss = 0.5 * _weighted(per_token, m, n, weights)
    return loss, {"clipfrac": clipfrac, "mean": (values * m).sum().detach() / n}


def entropy_bonus(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    n_tokens: int | float | torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-mean policy entropy over valid tokens / n_tokens (the loss adds `−coef ·` this);
    with `weights`, Σ entropy · weights."""
    n = _check_count(n_tokens)
    return _weighted(entropy, mask.to(entropy.dtype), n, weights)


def kl_loss(
    kl: torch.Tensor,
    mask: torch.Tensor,
    n_tokens: int | float | torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-mean KL(π_θ ‖ π_ref) estimate over valid tokens / n_tokens (KL as a loss term);
    with `weights`, Σ kl · weights."""
    n = _check_count(n_tokens)
    return _weighted(kl, mask.to(kl.dtype), n, weights)


def ptx_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, n_tokens: int | float | torch.Tensor
) -> torch.Tensor:
    """Pre-training / SFT negative log-likelihood: −Σ log π(y_t) over labelled tokens / n_tokens.

    Args:
        logprobs: Float[B, T] log-probs of the demonstration's labels (0 where unlabelled).
        mask: [B, T] labelled (response) positions.
        n_tokens: labelled tokens in the whole ptx batch (all micro-batches).
    """
    n = _check_count(n_tokens)
    return -(logprobs * mask.to(logprobs.dtype)).sum() / n


class PPOStats:
    """Accumulates scalar statistics over micro-batches, minibatches and epochs.

    `add(prefix, stats)` sums each value into the current minibatch; `end_minibatch()` closes it;
    `means()` returns the average over closed minibatches (each minibatch weighs the same, since the
    per-micro-batch values are already minibatch token-means).

    Under DDP each rank divides its token sums by the per-rank average count (see `ppo.update`), so
    the mean over ranks that `end_minibatch(ranks)` takes is the token-mean of the global
    minibatch — the same value on every rank (the approx-KL early stop agrees everywhere).
    """

    def __init__(self) -> None:
        self._current: dict[str, float] = defaultdict(float)
        self._total: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)
        self.first: dict[str, float] = {}

    def add(self, stats: dict[str, torch.Tensor | float], prefix: str = "") -> None:
        """Add micro-batch contributions (values already divided by the global count)."""
        for key, value in stats.items():
            self._current[prefix + key] += float(value)

    @property
    def current(self) -> dict[str, float]:
        """Totals of the minibatch being accumulated."""
        return dict(self._current)

    def end_minibatch(self, ranks: CrossRank = LOCAL) -> dict[str, float]:
        """Close the current minibatch; returns its totals averaged over the data-parallel ranks
        (remembered as `first` the first time)."""
        closed = dict(self._current)
        if ranks.world_size > 1 and closed:
            keys = sorted(closed)  # the same order on every rank
            local = torch.tensor([closed[k] for k in keys], dtype=torch.float64)  # [K]
            closed = dict(zip(keys, ranks.mean_over_ranks(local).tolist()))
        if not self.first:
            self.first = closed
        for key, value in closed.items():
            self._total[key] += value
            self._count[key] += 1
        self._current = defaultdict(float)
        return closed

    def means(self) -> dict[str, float]:
        """Average of every statistic over the closed minibatches."""
        return {key: self._total[key] / self._count[key] for key in self._total}
