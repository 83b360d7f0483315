"""Step 1 of a PPO iteration: sample responses to the prompts with the policy.

`rollout(models, prompts, cfg, sampler_logprobs=...)` trims the prompts' shared left padding,
samples with Hugging Face `generate` (KV cache, eval mode, micro-batches) and returns a frozen
`Rollout`. With `sampler_logprobs`, π_old and its entropy are reduced from the logits `generate`
computes anyway (`SampledLogprobs`), so step 3 needs no policy forward.

`generation.min_new_tokens` is applied by `SuppressEOS` (EOS logits set to −inf with one
`index_fill`), not by transformers' `MinNewTokensLengthLogitsProcessor`, which rebuilds an
`arange` + `isin` mask over the whole vocabulary at every step (0.35 ms vs 0.03 ms per step on
[8, 49152] logits, 2 CPU threads: ~10 ms per 32-token rollout). Both run before the temperature /
top-k / top-p warpers, so the sampled distribution and the random draws are the same.

Sampling: `generate` draws each token with `sample_categorical` (one uniform per row against the
float64 CDF) in place of `torch.multinomial`, which draws V exponentials per row: 10 ms vs 0.2 ms
per step on [8, 49152] probabilities (2 CPU threads), 0.3 s of a 32-token rollout. The same
distribution; only the random stream differs. `torch.multinomial` is swapped only inside our
`generate` calls and only for one draw per row of a CPU tensor (`cpu_sampling`;
`generation.fast_cpu_sampling: false` keeps torch's sampler and its random stream).

References: Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (EOS handling,
temperature-consistent log-probs); TRL's `PPOTrainer` (log-probs from the sampler's logits).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LogitsProcessor, LogitsProcessorList

from rlhf_lightning.kernels import token_stats
from rlhf_lightning.kernels.cpu_decode import fast_decode_linear
from rlhf_lightning.models.masks import response_mask
from rlhf_lightning.ppo.config import GenerationConfig
from rlhf_lightning.ppo.rollout import PromptBatch, Rollout, SampledLogprobs, trim_left_padding

__all__ = [
    "hf_generation_config",
    "SuppressEOS",
    "Samples",
    "sample_categorical",
    "cpu_sampling",
    "generate",
    "rollout",
]


def hf_generation_config(cfg: GenerationConfig, tokenizer) -> HFGenerationConfig:
    """A transformers GenerationConfig for sampling rollouts from our `GenerationConfig`
    (`min_new_tokens` is not in it: `generate` applies it with `SuppressEOS`)."""
    return HFGenerationConfig(
        do_sample=True,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


class SuppressEOS(LogitsProcessor):
    """EOS logits → −inf until `min_new_tokens` tokens follow the `prompt_width` prompt columns.

    Out of place (one copy of Float[b, V]): `generate` keeps the tensor it passes in as the raw
    logits (`output_logits`) that the sampler log-probs are read from.
    """

    def __init__(self, prompt_width: int, min_new_tokens: int, eos_token_id: int | Sequence[int]):
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.prompt_width, self.min_new_tokens = prompt_width, min_new_tokens
        self.eos = torch.tensor(ids, dtype=torch.long)  # [K]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """input_ids Long[b, t], scores Float[b, V] → Float[b, V]."""
        if input_ids.shape[1] - self.prompt_width >= self.min_new_tokens:
            return scores
        return scores.index_fill(1, self.eos.to(scores.device), float("-inf"))


def sample_categorical(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One draw per row of `probs` Float[b, V] (non-negative, rows with a positive sum) → Long[b, 1].

    Inverts the float64 CDF at one uniform per row: the first index whose cumulative
    probability exceeds u · total, so a zero-probability entry is never drawn.
    """
    cdf = probs.double().cumsum(-1)  # [b, V]
    total = cdf[:, -1:]  # [b, 1]
    u = torch.rand(len(cdf), 1, dtype=torch.float64, device=cdf.device, generator=generator)
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # < total
    index = torch.searchsorted(cdf, target, right=True)  # [b, 1]
    return index.clamp_(max=probs.shape[-1] - 1)


def _valid_probabilities(probs: torch.Tensor) -> bool:
    """Every entry finite and ≥ 0 and every row's sum > 0 (what `torch.multinomial` checks)."""
    total = probs.sum(-1)
    return bool(torch.isfinite(total).all() and (total > 0).all() and probs.min() >= 0)


@contextlib.contextmanager
def cpu_sampling() -> Iterator[None]:
    """Inside the context, `torch.multinomial(probs, 1)` on a 2-D CPU tensor (what transformers'
    sampling loop calls each step) is `sample_categorical`; every other call is unchanged."""
    original = torch.multinomial

    def multinomial(input, num_samples, replacement=False, *, generator=None, out=None):
        single = num_samples == 1 and input.dim() == 2 and input.device.type == "cpu"
        if single and out is None and _valid_probabilities(input):
            return sample_categorical(input, generator)  # else torch's sampler raises as before
        kwargs = {"generator": generator} if out is None else {"generator": generator, "out": out}
        return original(input, num_samples, replacement, **kwargs)

    torch.multinomial = multinomial
    try:
        yield
    finally:
        torch.multinomial = original


@dataclass
class Samples:
    """What `generate` returns. B = prompts, R = the longest response in the batch."""

    response_ids: torch.Tensor  # Long[B, R] right-padded after the first EOS
    response_mask: torch.Tensor  # Long[B, R] 1 up to and including EOS
    logprobs: torch.Tensor | None = None  # Float[B, R] log π(a_t) from the sampler's logits
    entropy: torch.Tensor | None = None  # Float[B, R] entropy of π at each sampled step


@torch.no_grad()
def rollout(models, prompts: PromptBatch, cfg: GenerationConfig, *, sampler_logprobs: bool):
    """Step 1: sample k = `cfg.samples_per_prompt` responses per prompt with `models.policy` (a
    `PPOModels`); the k rows of a prompt are adjacent and share a `Rollout.group` value.

    Args:
        prompts: Long[B, P] left-padded ids and mask, and the prompt texts.
        cfg: sampling settings (`temperature`, `micro_batch_size`; the HF config is in `vocab`).
        sampler_logprobs: also return π_old and entropy from the sampler's logits.
    Returns:
        `Rollout` with query [B·k, P'] (shared left padding trimmed) and response [B·k, R] tensors.
    """
    prompts, group = prompts.repeat(cfg.samples_per_prompt)
    query_ids, query_mask = trim_left_padding(prompts.input_ids, prompts.attention_mask)
    vocab = models.vocab
    samples = generate(
        models.policy,
        query_ids,
        query_mask,
        generation_config=vocab.hf_generation,
        eos_token_id=list(vocab.eos_ids),
        pad_token_id=vocab.pad_id,
        micro_batch_size=cfg.micro_batch_size,
        with_logprobs=sampler_logprobs,
        temperature=cfg.temperature,
        min_new_tokens=cfg.min_new_tokens,
        fast_cpu_sampling=cfg.fast_cpu_sampling,
        fast_cpu_decode=cfg.fast_cpu_decode,
    )
    sampled = None
    if samples.logprobs is not None:
        sampled = SampledLogprobs(samples.logprobs, samples.entropy)
    return Rollout(
        query_ids,
        query_mask,
        samples.response_ids,
        samples.response_mask,
        prompts.texts,
        sampled,
        group if cfg.samples_per_prompt > 1 else None,
    )


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
    min_new_tokens: int = 0,
    fast_cpu_sampling: bool = True,
    fast_cpu_decode: bool = True,
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
        min_new_tokens: EOS suppressed before this many new tokens (`SuppressEOS`; 0 = off).
        fast_cpu_sampling: draw with `sample_categorical` on CPU (`cpu_sampling`).
        fast_cpu_decode: the decode steps' float32 CPU linear layers run the memory-bound
            kernel `kernels.cpu_decode` (`fast_decode_linear`).
    """
    chunks: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    size = micro_batch_size or len(query_ids)
    width = query_ids.shape[1]
    config = copy.deepcopy(generation_config)
    config.output_logits, config.return_dict_in_generate = with_logprobs, True
    processors = LogitsProcessorList()
    if min_new_tokens:
        processors.append(SuppressEOS(width, min_new_tokens, eos_token_id))
    for start in range(0, len(query_ids), size):
        sampling = cpu_sampling() if fast_cpu_sampling else contextlib.nullcontext()
        with sampling, fast_decode_linear(fast_cpu_decode and query_ids.device.type == "cpu"):
            out = model.generate(
                input_ids=query_ids[start : start + size],
                attention_mask=query_mask[start : start + size],
                generation_config=config,
                logits_processor=processors,
            )
        ids = out.sequences[:, width:]  # [b, r]
        step_logits = list(out.logits) if with_logprobs else []  # r × Float[b, V]
        del out  # the list is now the only owner of the per-step logits
        logp = entropy = None
        if with_logprobs:
            logp, entropy = _sampled_stats(step_logits, ids, eos_token_id, temperature)
        chunks.append((ids, logp, entropy))
    return _joined(chunks, pad_token_id, eos_token_id, with_logprobs)


def _joined(chunks: list, pad_token_id: int, eos_token_id, with_logprobs: bool) -> Samples:
    """One `Samples` of the micro-batches' (ids Long[b, r], log-probs, entropy Float[b, r]),
    right-padded to the longest response (ids with `pad_token_id`, statistics with 0)."""
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
