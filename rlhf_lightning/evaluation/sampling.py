"""Seeded sampling of every policy on the same prompts, and the sequence KL to the reference.

Each prompt batch `i` is sampled after `torch.manual_seed(seed + i)`, with plain ancestral
sampling at the configured temperature (no top-k / top-p: the KL below is that of the
distribution actually sampled from). Every policy sees the same seeds, so paired comparisons
share their random numbers. Rows are prompt-major: row `b * K + k` is sample `k` of prompt `b`.

The sequence KL of a policy π to the reference π_ref is estimated on π's own samples y:
KL(π ‖ π_ref) ≈ mean over samples of Σ_t [log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)] at the
sampling temperature (the Monte-Carlo estimate whose expectation is the exact sequence KL; the
sum runs over the response tokens up to and including EOS). Log-probs come from
`rlhf_lightning.kernels.token_logprobs`, from one forward of [prompt | response] per model with
the positions `generate` used (`position_ids` of the mask).

Reference: Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (temperature-
consistent log-probs, position ids of left-padded prompts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from rlhf_lightning.kernels import token_logprobs
from rlhf_lightning.models.masks import ends_with_eos, position_ids, response_mask, response_texts

__all__ = ["SampleBatch", "generate_batch", "sequence_logratio"]


@dataclass
class SampleBatch:
    """The samples of one prompt batch. N = B prompts × K samples per prompt (prompt-major)."""

    messages: list
    """The B prompts as chat messages."""
    per_prompt: int
    """K: samples per prompt."""
    prompt_ids: torch.Tensor
    """Long[N, P] left-padded prompt of each row."""
    prompt_mask: torch.Tensor
    """Long[N, P] attention mask of the prompts."""
    response_ids: torch.Tensor
    """Long[N, R] generated tokens (padding after EOS)."""
    response_mask: torch.Tensor
    """Long[N, R] 1 on tokens up to and including the first EOS."""
    texts: list[str]
    """N decoded responses (without EOS and padding)."""
    ends: list[bool]
    """N flags: the response ended with EOS within `max_new_tokens`."""

    def rows(self, index: torch.Tensor) -> SampleBatch:
        """The rows `index` (Long[M]) as a batch with one sample per row (`per_prompt` = 1)."""
        keep = index.tolist()
        return SampleBatch(
            messages=[self.messages[i // self.per_prompt] for i in keep],
            per_prompt=1,
            prompt_ids=self.prompt_ids[index],
            prompt_mask=self.prompt_mask[index],
            response_ids=self.response_ids[index],
            response_mask=self.response_mask[index],
            texts=[self.texts[i] for i in keep],
            ends=[self.ends[i] for i in keep],
        )

    @property
    def lengths(self) -> list[int]:
        """Tokens per response, EOS included."""
        return self.response_mask.sum(1).tolist()


def _generation_config(tokenizer, per_prompt: int, max_new_tokens: int, temperature: float):
    return GenerationConfig(
        do_sample=True,
        num_return_sequences=per_prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


@torch.no_grad()
def generate_batch(
    model, tokenizer, batch: dict, *, per_prompt: int, max_new_tokens: int, temperature: float,
    seed: int, device: str = "cpu",
) -> SampleBatch:  # fmt: skip
    """`per_prompt` samples for each prompt of a left-padded prompt batch, after `manual_seed`."""
    torch.manual_seed(seed)
    ids = batch["input_ids"].to(device)  # [B, P]
    mask = batch["attention_mask"].to(device)  # [B, P]
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=_generation_config(tokenizer, per_prompt, max_new_tokens, temperature),
    )  # [B*K, P + R]
    generated = out[:, ids.shape[1] :]  # [N, R]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    resp_mask = response_mask(generated, eos) if eos else torch.ones_like(generated)  # [N, R]
    ends = ends_with_eos(generated, resp_mask, eos).tolist() if eos else [False] * len(generated)
    return SampleBatch(
        messages=list(batch["prompt_messages"]),
        per_prompt=per_prompt,
        prompt_ids=ids.repeat_interleave(per_prompt, dim=0),  # [N, P]
        prompt_mask=mask.repeat_interleave(per_prompt, dim=0),  # [N, P]
        response_ids=generated,
        response_mask=resp_mask,
        texts=response_texts(tokenizer, generated, resp_mask, eos),
        ends=ends,
    )


def _response_logprobs(
    model, samples: SampleBatch, rows: slice, temperature: float
) -> torch.Tensor:
    """Float[n, R] log π(y_t) of the response tokens of `rows` (0 after EOS)."""
    response = samples.response_ids[rows]  # [n, R]
    resp_mask = samples.response_mask[rows]  # [n, R]
    attention = torch.cat([samples.prompt_mask[rows], resp_mask], dim=1)  # [n, P + R]
    out = model(
        input_ids=torch.cat([samples.prompt_ids[rows], response], dim=1),
        attention_mask=attention,
        position_ids=position_ids(attention),
        logits_to_keep=response.shape[1] + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]  # [n, R, V]: position t predicts response token t
    return token_logprobs(logits, response, temperature=temperature, mask=resp_mask.bool())


@torch.no_grad()
def sequence_logratio(
    policy, reference, samples: SampleBatch, *, temperature: float, micro_batch: int
) -> torch.Tensor:
    """Float[N] Σ_t log π(y_t) − log π_ref(y_t) per row (0 when `policy is reference`)."""
    total = samples.response_ids.shape[0]
    if policy is reference:
        return torch.zeros(total)
    parts = []
    for start in range(0, total, micro_batch):
        rows = slice(start, start + micro_batch)
        ours = _response_logprobs(policy, samples, rows, temperature)  # [n, R]
        theirs = _response_logprobs(reference, samples, rows, temperature)  # [n, R]
        parts.append((ours - theirs).sum(dim=1).float().cpu())  # [n]
    return torch.cat(parts) if parts else torch.zeros(0)
