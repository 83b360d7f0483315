"""Metrics, sample tables and histograms of one PPO iteration (TensorBoard tag tree).

Tags: `objective/{reward, reward_raw, rlhf_reward, kl, kl_coef, entropy, gold}`,
`ppo/loss/{policy, value, ptx, kl, total}`, `ppo/policy/{approxkl, clipfrac, ratio_mean,
ratio_at_start, entropy, epochs_done, early_stop}`, `ppo/val/{clipfrac, explained_variance, mean}`,
`ppo/returns/mean`, `ppo/response_length/{mean, max}`, `ppo/response/eos_fraction`,
`perf/{rollout_s, score_s, logprob_s, update_s, iteration_s, tokens_per_s}`, `monitor/*`.

Under DDP the metrics are over the prompts of every rank (`ppo.distributed`), except `perf/*`
(this rank's timings); sample tables and histograms show rank 0's rollout.
"""

from __future__ import annotations

import math

import torch

from rlhf_lightning.models.masks import ends_with_eos
from rlhf_lightning.ppo.advantages import explained_variance, masked_mean
from rlhf_lightning.ppo.distributed import LOCAL, CrossRank
from rlhf_lightning.ppo.rollout import Rollout

__all__ = ["iteration_metrics", "sample_rows", "log_histograms"]


def iteration_metrics(
    rollout: Rollout,
    info: dict,
    update_stats: dict[str, float],
    kl_coef: float,
    ranks: CrossRank = LOCAL,
) -> dict[str, float]:
    """Flat dict of scalar metrics for `self.log_dict`, over the batch of every data-parallel rank
    (`ranks`; `update_stats` are already global), so every rank gets the same values. Timings
    (`perf/*`) are this rank's."""
    mask = rollout.response_mask
    lengths = mask.sum(1).float()  # [B]
    seq_kl = (rollout.kl * mask).sum(1)  # [B]
    gold = info.get("gold")
    per_sequence = {
        "objective/reward": rollout.scores,
        "objective/reward_raw": rollout.scores_raw,
        "objective/rlhf_reward": rollout.scores - kl_coef * seq_kl,
        "objective/kl": seq_kl,
        "ppo/response_length/mean": lengths,
        "ppo/response/eos_fraction": torch.full_like(lengths, info.get("eos_fraction", math.nan)),
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
    metrics = {key: total / count for key, total in zip(per_sequence, totals)}
    metrics["objective/kl_coef"] = float(kl_coef)
    metrics["objective/entropy"] = float(masked_mean(rollout.entropy, mask, ranks=ranks))
    metrics["ppo/val/explained_variance"] = explained_variance(
        rollout.values, rollout.returns, mask, ranks=ranks
    )
    metrics["ppo/returns/mean"] = float(masked_mean(rollout.returns, mask, ranks=ranks))
    metrics["ppo/advantages/mean"] = float(masked_mean(rollout.advantages, mask, ranks=ranks))
    metrics["ppo/response_length/max"] = float(ranks.max(lengths.max()))
    if gold is not None:
        metrics["objective/gold"] = totals[-2] / totals[-1] if totals[-1] else math.nan
    for key, value in update_stats.items():
        metrics[f"ppo/{key}"] = float(value)
    _add_timings(metrics, info, float(lengths.sum()))
    return metrics


def _add_timings(metrics: dict[str, float], info: dict, tokens: float) -> None:
    """`perf/*` of this rank: the step timings, their sum and the rollout throughput."""
    timings = {k: info[k] for k in ("rollout_s", "score_s", "logprob_s", "update_s") if k in info}
    for key, value in timings.items():
        metrics[f"perf/{key}"] = value
    metrics["perf/iteration_s"] = sum(timings.values())
    metrics["perf/tokens_per_s"] = tokens / max(info.get("rollout_s", 0.0), 1e-9)


def sample_rows(rollout: Rollout, info: dict, n: int) -> list[dict]:
    """First `n` rows of prompt / response / reward / gold / KL for the text table."""
    seq_kl = (rollout.kl * rollout.response_mask).sum(1)
    gold = info.get("gold")
    rows = []
    for i in range(min(n, len(rollout))):
        rows.append(
            {
                "prompt": info["prompts"][i][-300:],
                "response": info["responses"][i],
                "reward": float(rollout.scores[i]),
                "reward_raw": float(rollout.scores_raw[i]),
                "gold": float(gold[i]) if gold is not None else "",
                "kl": float(seq_kl[i]),
            }
        )
    return rows


def log_histograms(logger, rollout: Rollout, step: int) -> bool:
    """Reward and per-token KL histograms on TensorBoard loggers; False when none accepts them."""
    loggers = logger if isinstance(logger, list | tuple) else [logger]
    mask = rollout.response_mask.bool()
    wrote = False
    for item in loggers:
        experiment = getattr(item, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_histogram"):
            continue
        experiment.add_histogram("objective/reward_hist", rollout.scores.float().cpu(), step)
        experiment.add_histogram("objective/kl_token_hist", rollout.kl[mask].float().cpu(), step)
        wrote = True
    return wrote


def eos_fraction(rollout: Rollout, eos_ids: list[int]) -> float:
    """Fraction of responses that end with an EOS token."""
    ends = ends_with_eos(rollout.response_ids, rollout.response_mask, eos_ids)  # [B]
    return float(ends.float().mean())
