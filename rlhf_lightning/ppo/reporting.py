"""Metrics, sample tables and histograms of one PPO iteration (tags: `ppo.stats`).

`iteration_stats` reduces the outputs of steps 1–5 to a typed `IterationStats` over the batch of
every data-parallel rank (`ppo.distributed`), except the timings (this rank's); sample tables and
histograms show rank 0's rollout.
"""

from __future__ import annotations

import math

import torch

from rlhf_lightning.ppo.advantages import Advantages, explained_variance
from rlhf_lightning.ppo.distributed import LOCAL, CrossRank
from rlhf_lightning.ppo.estimators import group_reward_stats
from rlhf_lightning.ppo.logprobs import TokenStats
from rlhf_lightning.ppo.masked import masked_mean
from rlhf_lightning.ppo.rollout import Rollout
from rlhf_lightning.ppo.scoring import Scores
from rlhf_lightning.ppo.stats import IterationStats, StepTimings, UpdateStats

__all__ = ["iteration_stats", "sample_rows", "log_histograms"]


def _sequence_means(
    rollout: Rollout, scores: Scores, tokens: TokenStats, kl_coef: float, ranks: CrossRank
) -> dict[str, float]:
    """Per-sequence means over every rank's rows (float64 sums), plus the gold mean."""
    mask = rollout.response_mask
    lengths = mask.sum(1).float()  # [B]
    seq_kl = (tokens.kl * mask).sum(1)  # [B]
    gold = scores.gold
    eos_fraction = float(scores.ends_with_eos.float().mean())  # this rank's share
    per_sequence = {
        "reward": scores.shaped,
        "reward_raw": scores.raw,
        "rlhf_reward": scores.shaped - kl_coef * seq_kl,
        "kl": seq_kl,
        "length_mean": lengths,
        "eos_fraction": torch.full_like(lengths, eos_fraction),
    }  # name → Float[B]; the metric is the mean over all ranks' sequences
    counts = [len(rollout), sum(gold) if gold else 0.0, len(gold) if gold else 0]
    sums = torch.cat(
        [
            torch.stack([v.detach().double().sum() for v in per_sequence.values()]),
            torch.tensor(counts, dtype=torch.float64, device=lengths.device),
        ]
    )  # [K + 3]: per-sequence sums, sequences, Σ gold, gold count
    totals = ranks.sum(sums).tolist()
    count = totals[len(per_sequence)]
    means = {key: total / count for key, total in zip(per_sequence, totals)}
    if gold is not None:
        means["gold"] = totals[-2] / totals[-1] if totals[-1] else math.nan
    return means


def _group_stats(
    rollout: Rollout, adv: Advantages, ranks: CrossRank
) -> tuple[float | None, float | None]:
    """(mean group std of the sequence rewards Σ_t r_t, share of tied groups) over every rank's
    prompts; (None, None) with one sample per prompt."""
    if rollout.group is None:
        return None, None
    sums = ranks.sum(group_reward_stats(adv.rewards.sum(-1), rollout.group))  # [3]
    std_sum, tied, groups = sums.tolist()
    return std_sum / max(groups, 1), tied / max(groups, 1)


def iteration_stats(
    rollout: Rollout,
    scores: Scores,
    tokens: TokenStats,
    adv: Advantages,
    update: UpdateStats,
    timings: StepTimings,
    kl_coef: float,
    ranks: CrossRank = LOCAL,
) -> IterationStats:
    """The iteration's statistics over the batch of every data-parallel rank (`ranks`; `update`
    is already global), so every rank gets the same values; `timings` are this rank's."""
    mask = rollout.response_mask
    means = _sequence_means(rollout, scores, tokens, kl_coef, ranks)
    lengths = mask.sum(1).float()  # [B]
    group_std, tied = _group_stats(rollout, adv, ranks)
    ev = None
    if tokens.values is not None:
        ev = explained_variance(tokens.values, adv.returns, mask, ranks=ranks)
    return IterationStats(
        reward=means["reward"],
        reward_raw=means["reward_raw"],
        rlhf_reward=means["rlhf_reward"],
        kl=means["kl"],
        kl_coef=float(kl_coef),
        entropy=float(masked_mean(tokens.entropy, mask, ranks=ranks)),
        explained_variance=ev,
        returns_mean=float(masked_mean(adv.returns, mask, ranks=ranks)),
        advantages_mean=float(masked_mean(adv.advantages, mask, ranks=ranks)),
        length_mean=means["length_mean"],
        length_max=float(ranks.max(lengths.max())),
        eos_fraction=means["eos_fraction"],
        gold=means.get("gold"),
        update=update,
        timings=timings,
        tokens=float(lengths.sum()),
        group_reward_std=group_std,
        zero_advantage_groups=tied,
    )


def sample_rows(rollout: Rollout, scores: Scores, tokens: TokenStats, n: int) -> list[dict]:
    """Prompt / response / reward / gold / KL rows for the text table: the first `n` rows, or with
    k > 1 samples per prompt the first whole groups covering at least `n` rows, each row with its
    group and the group's reward spread (max − min of the shaped rewards)."""
    seq_kl = (tokens.kl * rollout.response_mask).sum(1)
    count = min(n, len(rollout))
    spread = None
    if rollout.group is not None:
        group = rollout.group
        k = int((group == group[0]).sum())
        count = min(-(-max(count, 1) // k) * k, len(rollout))
        spread = {}
        for g in group[:count].unique().tolist():
            shaped = scores.shaped[group == g]
            spread[g] = float(shaped.max() - shaped.min())
    rows = []
    for i in range(count):
        row = {
            "prompt": rollout.prompts[i][-300:],
            "response": scores.responses[i],
            "reward": float(scores.shaped[i]),
            "reward_raw": float(scores.raw[i]),
            "gold": float(scores.gold[i]) if scores.gold is not None else "",
            "kl": float(seq_kl[i]),
        }
        if spread is not None:
            g = int(rollout.group[i])
            row = {"group": g, **row, "group_reward_spread": spread[g]}
        rows.append(row)
    return rows


def log_histograms(
    logger, scores: Scores, tokens: TokenStats, mask: torch.Tensor, step: int
) -> bool:
    """Reward and per-token KL (valid tokens of `mask` [B, R]) histograms on TensorBoard loggers;
    False when none accepts them."""
    loggers = logger if isinstance(logger, list | tuple) else [logger]
    valid = mask.bool()
    wrote = False
    for item in loggers:
        experiment = getattr(item, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_histogram"):
            continue
        experiment.add_histogram("ppo/objective/reward_hist", scores.shaped.float().cpu(), step)
        experiment.add_histogram(
            "ppo/objective/kl_token_hist", tokens.kl[valid].float().cpu(), step
        )
        wrote = True
    return wrote
