"""Rollouts: sample responses, score them, and compute per-token log-probs and values.

Sequence layout used everywhere in PPO: `input_ids = [query | response]` with the query LEFT
padded to width P and the response RIGHT padded to width R (tokens after the first EOS are
padding). The logits that predict response token t sit at position P − 1 + t, so a forward pass
keeps only the last R + 1 positions (`logits_to_keep`) and drops the final one. Position ids are
`cumsum(attention_mask) − 1` (`rlhf_lightning.models.masks.position_ids`), the same rule
`generate` uses for left-padded prompts, so the training forward reproduces the sampler's
log-probs exactly (checked by `ratio_at_start`). Reward callables: `rlhf_lightning.scorers`.

References: Ziegler et al. 2019 and Stiennon et al. 2020 (rollout → score → KL-penalised reward);
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (EOS handling, padding,
temperature-consistent log-probs).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from rlhf_lightning.kernels import token_logprobs, token_stats
from rlhf_lightning.models.masks import position_ids, response_mask
from rlhf_lightning.ppo.distributed import LOCAL, CrossRank

__all__ = [
    "Rollout",
    "Samples",
    "trim_left_padding",
    "generate",
    "response_forward",
    "critic_values",
    "RunningMoments",
]


@dataclass
class Rollout:
    """One batch of experience. B = prompts, P = prompt width, R = response width."""

    query_ids: torch.Tensor  # Long[B, P] left-padded prompt ids
    query_mask: torch.Tensor  # Long[B, P] 1 on prompt tokens
    response_ids: torch.Tensor  # Long[B, R] sampled tokens, right-padded after EOS
    response_mask: torch.Tensor  # Long[B, R] 1 up to and including EOS
    logprobs: torch.Tensor | None = None  # Float[B, R] log π_old(a_t) (temperature applied)
    ref_logprobs: torch.Tensor | None = None  # Float[B, R] log π_ref(a_t)
    entropy: torch.Tensor | None = None  # Float[B, R] entropy of π_old at each step
    kl: torch.Tensor | None = None  # Float[B, R] per-token KL estimate (π_old vs π_ref)
    values: torch.Tensor | None = None  # Float[B, R] critic V(s_t)
    scores: torch.Tensor | None = None  # Float[B] shaped sequence reward (normalised, clipped)
    scores_raw: torch.Tensor | None = None  # Float[B] reward before normalisation / shaping
    rewards: torch.Tensor | None = None  # Float[B, R] per-token rewards (score at last token)
    advantages: torch.Tensor | None = None  # Float[B, R] (whitened) GAE advantages
    returns: torch.Tensor | None = None  # Float[B, R] GAE returns (value targets)

    @property
    def input_ids(self) -> torch.Tensor:
        """Long[B, P + R] query followed by response."""
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """Long[B, P + R] attention mask of `input_ids`."""
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, index: torch.Tensor) -> Rollout:
        """Rows `index` (Long[b]) of every tensor field, without the prompt columns that are
        padding in every selected row (a micro-batch of short prompts runs narrower)."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = value[index] if isinstance(value, torch.Tensor) else value
        values["query_ids"], values["query_mask"] = trim_left_padding(
            values["query_ids"], values["query_mask"]
        )
        return Rollout(**values)


def trim_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns of left-padded Long[B, P] ids/mask that no row attends to (at
    least one column is kept). Positions come from the mask (`position_ids`), so nothing else
    changes."""
    used = mask.bool().any(0)  # [P]
    first = int(used.long().argmax()) if bool(used.any()) else mask.shape[1] - 1
    return ids[:, first:], mask[:, first:]


@dataclass
class Samples:
    """What `generate` returns. B = prompts, R = the longest response in the batch."""

    response_ids: torch.Tensor  # Long[B, R] right-padded after the first EOS
    response_mask: torch.Tensor  # Long[B, R] 1 up to and including EOS
    logprobs: torch.Tensor | None = None  # Float[B, R] log π(a_t) from the sampler's logits
    entropy: torch.Tensor | None = None  # Float[B, R] entropy of π at each sampled step


@torch.no_grad()
def generate(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    generation_config,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    micro_batch_size: int | None = None,
    with_logprobs: bool = False,
    temperature: float = 1.0,
) -> Samples:
    """Sample responses for left-padded prompts in micro-batches (KV cache on, eval mode).

    With `with_logprobs`, the raw logits `generate` computes for every step (before temperature
    and top-k/top-p) are reduced right away to log π(a_t) and entropy of softmax(z / T) with the
    kernels, so the policy needs no second forward pass for π_old. `generate` holds one
    micro-batch's Float[b, R, V] logits until it returns (bound it with `micro_batch_size`); they
    are freed step by step while being reduced.

    Args:
        query_ids: Long[B, P]; query_mask: Long[B, P].
        generation_config: a `transformers.GenerationConfig`.
    """
    chunks: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    size = micro_batch_size or len(query_ids)
    width = query_ids.shape[1]
    config = copy.deepcopy(generation_config)
    config.output_logits, config.return_dict_in_generate = with_logprobs, True
    for start in range(0, len(query_ids), size):
        out = model.generate(
            input_ids=query_ids[start : start + size],
            attention_mask=query_mask[start : start + size],
            generation_config=config,
        )
        ids = out.sequences[:, width:]  # [b, r]
        step_logits = list(out.logits) if with_logprobs else []  # r × Float[b, V]
        del out  # the list is now the only owner of the per-step logits
        logp = entropy = None
        if with_logprobs:
            logp, entropy = _sampled_stats(step_logits, ids, eos_token_id, temperature)
        chunks.append((ids, logp, entropy))
    longest = max(c[0].shape[1] for c in chunks)

    def cat(index: int, value) -> torch.Tensor:
        parts = [c[index] for c in chunks]
        return torch.cat(
            [nn.functional.pad(x, (0, longest - x.shape[1]), value=value) for x in parts]
        )

    response_ids = cat(0, pad_token_id)  # [B, R]
    mask = response_mask(response_ids, eos_token_id)  # [B, R]
    samples = Samples(response_ids.masked_fill(mask == 0, pad_token_id), mask)
    if with_logprobs:
        samples.logprobs, samples.entropy = cat(1, 0.0), cat(2, 0.0)  # [B, R] each
    return samples


def _sampled_stats(
    step_logits: list[torch.Tensor], ids: torch.Tensor, eos_token_id, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(a_t) and entropy Float[b, r] from generate's per-step raw logits (a list of r
    Float[b, V], emptied as it goes so each step's logits are freed once reduced)."""
    mask = response_mask(ids, eos_token_id).bool()  # [b, r]
    logp = torch.zeros(ids.shape, device=ids.device)  # [b, r]
    entropy = torch.zeros_like(logp)  # [b, r]
    for t in range(ids.shape[1]):
        logits = step_logits.pop(0)  # [b, V]
        lp, ent, _ = token_stats(logits, ids[:, t], temperature=temperature, mask=mask[:, t])
        logp[:, t], entropy[:, t] = lp, ent
    return logp, entropy


def response_forward(
    model: nn.Module,
    rollout: Rollout,
    *,
    temperature: float,
    ref_logits: torch.Tensor | None = None,
    with_hidden: bool = False,
    return_logits: bool = False,
):
    """Forward `[query | response]` and return statistics of the response tokens.

    Returns a dict with `logprobs` Float[B, R], `entropy` Float[B, R], `kl` Float[B, R] (exact
    KL to `ref_logits` Float[B, R, V], only when given), optionally `hidden` Float[B, R, H] (last
    hidden state at the positions that predict each token) and `logits` Float[B, R, V].
    All statistics come from `rlhf_lightning.kernels.token_stats` (one pass over the vocabulary).
    """
    steps = rollout.response_ids.shape[1]
    attention = rollout.attention_mask  # [B, P + R]
    out = model(
        input_ids=rollout.input_ids,
        attention_mask=attention,
        position_ids=position_ids(attention),
        logits_to_keep=steps + 1,
        output_hidden_states=with_hidden,
        use_cache=False,
    )
    logits = out.logits[:, :-1]  # [B, R, V]
    mask = rollout.response_mask.bool()  # [B, R]
    logp, entropy, kl = token_stats(
        logits, rollout.response_ids, ref_logits, temperature=temperature, mask=mask
    )  # each [B, R]
    result = {"logprobs": logp, "entropy": entropy, "kl": kl}
    if with_hidden:
        result["hidden"] = out.hidden_states[-1][:, -steps - 1 : -1]  # [B, R, H]
    if return_logits:
        result["logits"] = logits
    return result


def reference_logprobs(
    model: nn.Module, rollout: Rollout, *, temperature: float, keep_logits: bool = False
):
    """log π_ref of the response tokens (Float[B, R]) and, when asked, the logits Float[B, R, V]."""
    steps = rollout.response_ids.shape[1]
    attention = rollout.attention_mask
    logits = model(
        input_ids=rollout.input_ids,
        attention_mask=attention,
        position_ids=position_ids(attention),
        logits_to_keep=steps + 1,
        use_cache=False,
    ).logits[:, :-1]  # [B, R, V]
    logp = token_logprobs(
        logits, rollout.response_ids, temperature=temperature, mask=rollout.response_mask.bool()
    )  # [B, R]
    return logp, (logits if keep_logits else None)


def critic_values(critic: nn.Module, rollout: Rollout) -> torch.Tensor:
    """Values V(s_t) of a separate critic (`ppo.models.CriticModel`) for the response steps."""
    values = critic(rollout.input_ids, rollout.attention_mask)  # [B, P + R]
    steps = rollout.response_ids.shape[1]
    return values[:, -steps - 1 : -1] * rollout.response_mask  # [B, R]


class RunningMoments:
    """Running mean / std of scalar rewards (Chan et al. parallel update); state-dict-able.

    `update(values, ranks)` merges the batch of every data-parallel rank (`ppo.distributed`), so
    the moments are those of all rewards seen, the same on every rank and for any world size.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, values: torch.Tensor, ranks: CrossRank = LOCAL) -> None:
        """Merge a batch Float[B] (this rank's part of it) into the running moments."""
        values = values.detach().double().flatten()  # [B]
        n, total = ranks.sum(torch.stack([values.new_tensor(values.numel()), values.sum()]))
        n = int(n)
        if n == 0:
            return
        batch_mean = float(total) / n
        batch_m2 = float(ranks.sum(((values - batch_mean) ** 2).sum()))
        merged = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / merged
        self.m2 += batch_m2 + delta**2 * self.count * n / merged
        self.count = merged

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]
