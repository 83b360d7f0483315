"""Typed statistics of one PPO iteration and the TensorBoard tag tree they are logged under.

Every PPO tag starts with `ppo/`:

- `ppo/objective/{reward, reward_raw, rlhf_reward, kl, kl_coef, entropy, gold}` (+ histograms
  `ppo/objective/{reward_hist, kl_token_hist}`), and with k > 1 samples per prompt
  `ppo/objective/{group_reward_std, zero_advantage_groups}`;
- `ppo/loss/{policy, value, kl, ptx, total}`, `ppo/policy/{entropy, approxkl, clipfrac,
  ratio_mean, dual_clipfrac, ratio_at_start, epochs_done, early_stop}`,
  `ppo/value/{clipfrac, mean, explained_variance}` (with a critic), `ppo/returns/mean`,
  `ppo/advantages/mean`,
  `ppo/response/{length_mean, length_max, eos_fraction}`;
- `ppo/perf/{rollout_s, score_s, logprob_s, update_s, iteration_s, tokens_per_s}` (this rank's);
- `ppo/monitor/*` (the reward-hacking monitor's signals) and the text table `ppo/samples`.

Names are given at the logging boundary (`to_tags()`); `ppo.losses.PPOStats` accumulates under
its own keys (`loss/…`, `policy/…`, `val/…`), in the same order as always.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["UpdateStats", "StepTimings", "IterationStats"]


@dataclass(frozen=True)
class UpdateStats:
    """Step 5's statistics: means over the closed minibatches (and over ranks)."""

    loss_policy: float
    """Clipped surrogate loss."""
    loss_value: float | None
    """Clipped value loss (None without a critic)."""
    loss_total: float
    """The optimised sum of the terms."""
    entropy: float
    """Policy entropy per token in the update pass."""
    approxkl: float
    """k3 estimate of KL(π_old ‖ π_θ)."""
    clipfrac: float
    """Share of tokens where the ratio clip is active."""
    ratio_mean: float
    """Mean ratio π_θ / π_old."""
    value_clipfrac: float | None
    """Share of tokens where the value clip is active (None without a critic)."""
    value_mean: float | None
    """Mean value in the update pass (None without a critic)."""
    ratio_at_start: float
    """Mean ratio of the first minibatch (1 when the update reproduces the rollout)."""
    epochs_done: int
    """PPO epochs run (fewer than `update.ppo_epochs` after an early stop)."""
    early_stop: bool
    """Whether the approx-KL early stop fired."""
    loss_kl: float | None = None
    """KL loss term (`kl.mode: loss`), else None."""
    loss_ptx: float | None = None
    """PPO-ptx NLL (`update.ptx_coef > 0` with labelled tokens), else None."""
    dual_clipfrac: float | None = None
    """Share of tokens capped by dual-clip (`update.dual_clip`), else None."""

    @classmethod
    def from_means(
        cls, means: dict[str, float], ratio_at_start: float, epochs_done: int, early_stop: bool
    ) -> UpdateStats:
        """From `PPOStats.means()` (keys `loss/…`, `policy/…`, `val/…`)."""
        return cls(
            loss_policy=means["loss/policy"],
            loss_value=means.get("loss/value"),
            loss_total=means["loss/total"],
            entropy=means["policy/entropy"],
            approxkl=means["policy/approxkl"],
            clipfrac=means["policy/clipfrac"],
            ratio_mean=means["policy/ratio_mean"],
            value_clipfrac=means.get("val/clipfrac"),
            value_mean=means.get("val/mean"),
            ratio_at_start=ratio_at_start,
            epochs_done=epochs_done,
            early_stop=early_stop,
            loss_kl=means.get("loss/kl"),
            loss_ptx=means.get("loss/ptx"),
            dual_clipfrac=means.get("policy/dual_clipfrac"),
        )

    def to_tags(self) -> dict[str, float]:
        """`ppo/loss/*`, `ppo/policy/*`, `ppo/value/{clipfrac, mean}` (options that are off are
        left out)."""
        tags = {
            "ppo/loss/policy": self.loss_policy,
            "ppo/loss/value": self.loss_value,
            "ppo/policy/entropy": self.entropy,
            "ppo/loss/kl": self.loss_kl,
            "ppo/loss/total": self.loss_total,
            "ppo/policy/approxkl": self.approxkl,
            "ppo/policy/clipfrac": self.clipfrac,
            "ppo/policy/ratio_mean": self.ratio_mean,
            "ppo/policy/dual_clipfrac": self.dual_clipfrac,
            "ppo/value/clipfrac": self.value_clipfrac,
            "ppo/value/mean": self.value_mean,
            "ppo/loss/ptx": self.loss_ptx,
            "ppo/policy/ratio_at_start": self.ratio_at_start,
            "ppo/policy/epochs_done": float(self.epochs_done),
            "ppo/policy/early_stop": float(self.early_stop),
        }
        return {k: float(v) for k, v in tags.items() if v is not None}


@dataclass(frozen=True)
class StepTimings:
    """Wall-clock seconds of the steps on this rank."""

    rollout_s: float
    """Step 1 (generation)."""
    score_s: float
    """Step 2 (decoding, reward, shaping, gold)."""
    logprob_s: float
    """Step 3 (reference / policy / critic forwards)."""
    update_s: float
    """Step 5 (the PPO epochs)."""

    def to_tags(self, tokens: float) -> dict[str, float]:
        """`ppo/perf/*`; `tokens` = response tokens sampled on this rank (for tokens_per_s)."""
        steps = {
            "rollout_s": self.rollout_s,
            "score_s": self.score_s,
            "logprob_s": self.logprob_s,
            "update_s": self.update_s,
        }
        tags = {f"ppo/perf/{k}": v for k, v in steps.items()}
        tags["ppo/perf/iteration_s"] = sum(steps.values())
        tags["ppo/perf/tokens_per_s"] = tokens / max(self.rollout_s, 1e-9)
        return tags


@dataclass(frozen=True)
class IterationStats:
    """Everything logged for one PPO iteration (over every data-parallel rank but `timings`)."""

    reward: float
    """Mean shaped reward."""
    reward_raw: float
    """Mean raw reward."""
    rlhf_reward: float
    """Mean shaped reward − β · sequence KL."""
    kl: float
    """Mean sequence KL (what the adaptive controller reads)."""
    kl_coef: float
    """β of the KL controller this iteration."""
    entropy: float
    """Rollout policy entropy per token."""
    explained_variance: float | None
    """1 − Var[returns − values] / Var[returns] (None without a critic)."""
    returns_mean: float
    """Mean return per token."""
    advantages_mean: float
    """Mean advantage per token."""
    length_mean: float
    """Mean response length (tokens)."""
    length_max: float
    """Longest response."""
    eos_fraction: float
    """Share of responses ending with EOS."""
    gold: float | None
    """Mean gold score (None without a gold labeler)."""
    update: UpdateStats
    """Step 5's statistics."""
    timings: StepTimings
    """This rank's step timings."""
    tokens: float
    """Response tokens sampled on this rank."""
    monitor: dict[str, float] = field(default_factory=dict)
    """The reward-hacking monitor's signals."""
    group_reward_std: float | None = None
    """Mean over prompts of the std of their k samples' sequence rewards (None for k = 1)."""
    zero_advantage_groups: float | None = None
    """Share of prompts whose k samples got equal rewards (zero GRPO/RLOO advantage; None for
    k = 1)."""

    def to_tags(self) -> dict[str, float]:
        """The flat `ppo/…` tag → value dict that is logged and kept in `PPOModule.history`."""
        tags = {
            "ppo/objective/reward": self.reward,
            "ppo/objective/reward_raw": self.reward_raw,
            "ppo/objective/rlhf_reward": self.rlhf_reward,
            "ppo/objective/kl": self.kl,
            "ppo/response/length_mean": self.length_mean,
            "ppo/response/eos_fraction": self.eos_fraction,
            "ppo/objective/kl_coef": self.kl_coef,
            "ppo/objective/entropy": self.entropy,
            "ppo/value/explained_variance": self.explained_variance,
            "ppo/objective/group_reward_std": self.group_reward_std,
            "ppo/objective/zero_advantage_groups": self.zero_advantage_groups,
            "ppo/returns/mean": self.returns_mean,
            "ppo/advantages/mean": self.advantages_mean,
            "ppo/response/length_max": self.length_max,
        }
        tags = {k: v for k, v in tags.items() if v is not None}
        if self.gold is not None:
            tags["ppo/objective/gold"] = self.gold
        tags.update(self.update.to_tags())
        tags.update(self.timings.to_tags(self.tokens))
        tags.update({f"ppo/monitor/{k}": v for k, v in self.monitor.items()})
        return tags
