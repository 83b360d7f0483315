"""Metrics, sample tables and histograms of one PPO iteration (tags: `ppo.stats`).

`iteration_stats` reduces the outputs of steps 1–5 to a typed `IterationStats` over the batch of
every data-parallel rank (`ppo.distributed`), except the timings (this rank's); sample tables and
histograms show rank 0's rollout.
"""

from __future__ import annotations

import math

import torch

from rlhf_lightning.ppo.advantages import Advantages, explained_variance, masked_mean
from rlhf_lightning.ppo.distributed import LOCAL, CrossRank
from rlhf_lightning.ppo.logprobs import TokenStats
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
    return IterationStats(
        reward=means["reward"],
        reward_raw=means["reward_raw"],
        rlhf_reward=means["rlhf_reward"],
        kl=means["kl"],
        kl_coef=float(kl_coef),
        entropy=float(masked_mean(tokens.entropy, mask, ranks=ranks)),
        explained_variance=explained_variance(tokens.values, adv.returns, mask, ranks=ranks),
        returns_mean=float(masked_mean(adv.returns, mask, ranks=ranks)),
        advantages_mean=float(masked_mean(adv.advantages, mask, ranks=ranks)),
        length_mean=means["length_mean"],
        length_max=float(ranks.max(lengths.max())),
        eos_fraction=means["eos_fraction"],
        gold=means.get("gold"),
        update=update,
        timings=timings,
        tokens=float(lengths.sum()),
    )


def sample_rows(rollout: Rollout, scores: Scores, tokens: TokenStats, n: int) -> list[dict]:
    """First `n` rows of prompt / response / reward / gold / KL for the text table."""
    seq_kl = (tokens.kl * rollout.response_mask).sum(1)
    rows = []
    for i in range(min(n, len(rollout))):
        rows.append(
            {
                "prompt": rollout.prompts[i][-300:],
                "response": scores.responses[i],
                "reward": float(scores.shaped[i]),
                "reward_raw": float(scores.raw[i]),
                "gold": float(scores.gold[i]) if scores.gold is not None else "",
                "kl": float(seq_kl[i]),
            }
        )
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
