"""The rollout container (output of step 1) and the sequence-layout helpers every PPO step uses.

Sequence layout used everywhere in PPO: `input_ids = [query | response]` with the query LEFT
padded to width P and the response RIGHT padded to width R (tokens after the first EOS are
padding). The logits that predict response token t sit at position P − 1 + t, so a forward pass
keeps only the last R + 1 positions (`logits_to_keep`) and drops the final one. Position ids are
`cumsum(attention_mask) − 1` (`rlhf_lightning.models.masks.position_ids`), the same rule
`generate` uses for left-padded prompts, so the training forward reproduces the sampler's
log-probs exactly (checked by `ratio_at_start`).

References: Ziegler et al. 2019 and Stiennon et al. 2020 (rollout → score → KL-penalised reward);
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (EOS handling, padding).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

__all__ = [
    "PromptBatch",
    "SampledLogprobs",
    "Sequences",
    "Rollout",
    "trim_left_padding",
    "micro_batches",
]


@dataclass(frozen=True)
class PromptBatch:
    """The prompts of one PPO iteration, from the datamodule's prompt batch."""

    input_ids: torch.Tensor
    """Long[B, P] left-padded prompt ids."""
    attention_mask: torch.Tensor
    """Long[B, P] 1 on prompt tokens."""
    texts: list[str]
    """The B prompt texts (as rendered for the policy)."""

    @classmethod
    def from_batch(cls, batch: dict) -> PromptBatch:
        """From a datamodule prompt batch (`input_ids`, `attention_mask`, `prompt_text`)."""
        return cls(batch["input_ids"], batch["attention_mask"], list(batch["prompt_text"]))

    def repeat(self, k: int) -> tuple[PromptBatch, torch.Tensor]:
        """Each prompt k times in a row (`[p0, p0, p1, p1]` for k = 2) and the group of every row:
        Long[B·k] index of its prompt in this batch."""
        group = torch.arange(len(self.texts), device=self.input_ids.device).repeat_interleave(k)
        repeated = PromptBatch(
            self.input_ids.repeat_interleave(k, dim=0),
            self.attention_mask.repeat_interleave(k, dim=0),
            [text for text in self.texts for _ in range(k)],
        )
        return repeated, group


@dataclass(frozen=True)
class SampledLogprobs:
    """π_old statistics read from the sampler's logits (when `uses_sampler_logprobs`)."""

    logprobs: torch.Tensor
    """Float[B, R] log π_old(a_t) at the sampling temperature, 0 on padding."""
    entropy: torch.Tensor
    """Float[B, R] entropy of π_old at each sampled step, 0 on padding."""


class Sequences:
    """`[query | response]` rows of a frozen dataclass with `query_ids`/`query_mask` Long[B, P]
    and `response_ids`/`response_mask` Long[B, R] fields (`Rollout`, `Experience`)."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

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

    def select(self, index: torch.Tensor):
        """Rows `index` (Long[b]), without the prompt columns that are padding in every selected
        row (a micro-batch of short prompts runs narrower)."""
        return select_rows(self, index)


@dataclass(frozen=True)
class Rollout(Sequences):
    """Step 1's output: sampled responses. B = prompts, P = prompt width, R = response width."""

    query_ids: torch.Tensor
    """Long[B, P] left-padded prompt ids (columns no row attends to are trimmed)."""
    query_mask: torch.Tensor
    """Long[B, P] 1 on prompt tokens."""
    response_ids: torch.Tensor
    """Long[B, R] sampled tokens, right-padded after the first EOS."""
    response_mask: torch.Tensor
    """Long[B, R] 1 up to and including EOS."""
    prompts: list[str]
    """The B prompt texts."""
    sampled: SampledLogprobs | None = None
    """π_old from the sampler; None when step 3 runs a policy forward instead (a config choice,
    not a step that has not run yet)."""
    group: torch.Tensor | None = None
    """Long[B] the prompt (group) of every row: the k = `generation.samples_per_prompt` samples of
    a prompt share a value and are adjacent; None = one sample per prompt."""

    def group_ids(self) -> torch.Tensor:
        """Long[B] group of every row (`group`, or each row its own group when None)."""
        if self.group is not None:
            return self.group
        return torch.arange(len(self), device=self.query_ids.device)


def select_rows(container, index: torch.Tensor):
    """Rows `index` (Long[b]) of a frozen dataclass of [B, ...] tensors (nested dataclasses and
    lists too); its `query_ids`/`query_mask` lose the columns that are padding in every row."""
    values = {}
    for f in fields(container):
        value = getattr(container, f.name)
        if isinstance(value, torch.Tensor):
            value = value[index]
        elif isinstance(value, list):
            value = [value[i] for i in index.tolist()]
        elif value is not None and hasattr(value, "__dataclass_fields__"):
            value = select_rows(value, index)
        values[f.name] = value
    if "query_ids" in values:
        values["query_ids"], values["query_mask"] = trim_left_padding(
            values["query_ids"], values["query_mask"]
        )
    return replace(container, **values)


def trim_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns of left-padded Long[B, P] ids/mask that no row attends to (at
    least one column is kept). Positions come from the mask (`position_ids`), so nothing else
    changes."""
    used = mask.bool().any(0)  # [P]
    first = int(used.long().argmax()) if bool(used.any()) else mask.shape[1] - 1
    return ids[:, first:], mask[:, first:]


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Consecutive slices of `size` rows covering `n` rows (one slice when size is None)."""
    size = size or n
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]
