"""Step 2 of a PPO iteration: score the responses and shape the sequence rewards.

A `RewardScorer` gives the raw reward Float[B] of a rollout: `RewardModelScorer` (an RM export,
read at the last token with position ids, groups of k > 1 samples packed so that their prompt is
computed once, `ppo.packing`; a reward model with another vocabulary scores the re-tokenised text) or `RewardFunction` (a `module:function` callable, `rlhf_lightning.scorers`).
`shape_scores` then normalises (by the export's stored statistics, by running moments over all
ranks, or not at all), subtracts the missing-EOS penalty and clips, in that order. `score`
returns everything as one frozen `Scores`.

References: Ziegler et al. 2019 (reward normalisation); Huang et al. 2024, "The N+
Implementation Details of RLHF with PPO" (missing-EOS penalty, reward clipping).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from rlhf_lightning.models.masks import ends_with_eos, response_texts
from rlhf_lightning.models.reward_export import (
    backbone_and_head,
    normalise,
    score_rows,
    score_texts,
)
from rlhf_lightning.ppo import packing, varlen
from rlhf_lightning.ppo.compile import plan_of
from rlhf_lightning.ppo.config import RewardConfig
from rlhf_lightning.ppo.distributed import CrossRank
from rlhf_lightning.ppo.models import PPOModels, Vocab
from rlhf_lightning.ppo.rollout import Rollout, micro_batches
from rlhf_lightning.ppo.running_moments import RunningMoments
from rlhf_lightning.scorers import BatchScorer

__all__ = ["RewardScorer", "RewardModelScorer", "RewardFunction", "Scores", "shape_scores", "score"]


class RewardScorer(Protocol):
    """Raw sequence rewards of a rollout."""

    stats: dict | None
    """Stored reward statistics (`mean`, `std`) for `reward.normalize: stats`; None = none."""

    def __call__(self, rollout: Rollout, responses: list[str], ends: torch.Tensor) -> torch.Tensor:
        """Float[B] raw rewards; `responses` are the decoded texts, `ends` Bool[B] EOS flags."""
        ...


@dataclass(frozen=True)
class RewardModelScorer:
    """An RM export (`AutoModelForSequenceClassification`) scoring the rollout's tokens."""

    model: nn.Module
    """The reward model (frozen, eval mode during the step)."""
    stats: dict | None
    """Its `reward_stats.json` (None when absent)."""
    tokenizer: object | None
    """The RM's tokenizer when its vocabulary differs from the policy's (texts are re-tokenised);
    None = score the policy's token ids directly."""
    vocab: Vocab
    """The policy's vocabulary (separator and EOS ids for re-tokenised texts)."""
    micro_batch_size: int | None
    """Rows per RM forward (`reward.micro_batch_size`); None = the whole batch."""

    def __call__(self, rollout: Rollout, responses: list[str], ends: torch.Tensor) -> torch.Tensor:
        if self.tokenizer is not None:  # different vocabulary: score re-tokenised text
            eos = self.tokenizer.eos_token or ""
            sep = self.vocab.response_separator
            texts = [
                p + sep + r + (eos if e else "")
                for p, r, e in zip(rollout.prompts, responses, ends.tolist())
            ]
            scores = score_texts(
                self.model, self.tokenizer, texts, batch_size=self.micro_batch_size
            )
            return torch.tensor(scores, dtype=torch.float32, device=rollout.query_ids.device)
        plan, backbone = plan_of(self.model), backbone_and_head(self.model)
        out = []
        for part in micro_batches(len(rollout), self.micro_batch_size):
            sub = rollout.select(torch.arange(len(rollout))[part])
            route = plan.route(sub.group)
            if route == "groups":  # k > 1: each prompt once (`ppo.packing`)
                packed = packing.pack_rows(sub, sub.group)
                out.append(packing.packed_scores(*backbone, packed, plan.trunk_call))
            elif route == "varlen":  # real tokens only (`ppo.varlen`)
                out.append(varlen.varlen_scores(*backbone, sub, plan.trunk_call))
            else:
                forward = plan_of(backbone[0]).call
                out.append(score_rows(self.model, sub.input_ids, sub.attention_mask, forward))
        return torch.cat(out)  # [B]


@dataclass(frozen=True)
class RewardFunction:
    """A `module:function` reward callable (`rlhf_lightning.scorers.BatchScorer`)."""

    fn: BatchScorer
    """`fn(prompts, responses) -> list[float]`."""
    stats: dict | None = None
    """Always None (a callable has no stored statistics)."""

    def __call__(self, rollout: Rollout, responses: list[str], ends: torch.Tensor) -> torch.Tensor:
        scores = self.fn(list(rollout.prompts), responses)
        return torch.tensor(scores, dtype=torch.float32, device=rollout.query_ids.device)


@dataclass(frozen=True)
class Scores:
    """Step 2's output. B = prompts."""

    responses: list[str]
    """The B decoded responses (without EOS and padding)."""
    raw: torch.Tensor
    """Float[B] reward before normalisation and shaping."""
    shaped: torch.Tensor
    """Float[B] normalised, EOS-penalised, clipped reward (what PPO trains on)."""
    ends_with_eos: torch.Tensor
    """Bool[B] whether each response ended with EOS."""
    gold: list[float] | None
    """Gold labeler scores (None without `reward.gold`)."""
    running: RunningMoments
    """Running reward moments after this batch (unchanged unless `normalize: running`)."""


def shape_scores(
    raw: torch.Tensor,
    ends: torch.Tensor,
    cfg: RewardConfig,
    stats: dict | None,
    running: RunningMoments,
    ranks: CrossRank,
) -> tuple[torch.Tensor, RunningMoments]:
    """Normalise, penalise a missing EOS, clip: Float[B] → (Float[B], moments after the batch)."""
    scores = raw.clone()
    if cfg.normalize == "stats" and stats:
        scores = normalise(scores, stats)
    elif cfg.normalize == "running":
        running = running.merged(raw, ranks)  # moments of every rank's rewards
        scores = (scores - running.mean) / max(running.std, 1e-6)
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~ends).float()
    if cfg.clip is not None:
        scores = scores.clamp(-cfg.clip, cfg.clip)
    return scores, running


@torch.no_grad()
def score(
    models: PPOModels,
    rollout: Rollout,
    cfg: RewardConfig,
    running: RunningMoments,
    ranks: CrossRank,
) -> Scores:
    """Step 2: decode, score (`models.reward`), shape (`cfg`, `running` over `ranks`), gold."""
    vocab = models.vocab
    texts = response_texts(
        vocab.tokenizer, rollout.response_ids, rollout.response_mask, vocab.eos_ids
    )
    ends = ends_with_eos(rollout.response_ids, rollout.response_mask, vocab.eos_ids)  # [B]
    raw = models.reward(rollout, texts, ends)  # [B]
    shaped, running = shape_scores(raw, ends, cfg, models.reward.stats, running, ranks)
    gold = models.gold(list(rollout.prompts), texts) if models.gold is not None else None
    return Scores(texts, raw, shaped, ends, gold, running)
