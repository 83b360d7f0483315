"""Steps 1–4 of a PPO iteration: rollout, score, log-probs/values/KL, advantages.

`collect_experience(module, batch)` turns a left-padded prompt batch into a fully populated
`Rollout` (and a dict of diagnostics), running every model under `no_grad` in eval mode and in
rollout micro-batches. It reads the module's models and config groups (see `PPOModule`).
Under DDP each rank collects its own prompts; the running reward moments and the advantage
whitening are computed over every rank's batch (`ppo.distributed`).

References: Ziegler et al. 2019 (KL-penalised reward, adaptive β); Stiennon et al. 2020;
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO".
"""

from __future__ import annotations

import time

import torch
from transformers import GenerationConfig as HFGenerationConfig

from rlhf_lightning.kernels import kl_penalty
from rlhf_lightning.models.masks import ends_with_eos, response_texts
from rlhf_lightning.models.reward_export import normalise, score_rows, score_texts
from rlhf_lightning.ppo.advantages import gae, kl_penalised_rewards, whiten
from rlhf_lightning.ppo.distributed import module_ranks
from rlhf_lightning.ppo.models import reference_context
from rlhf_lightning.ppo.rollout import (
    Rollout,
    critic_values,
    generate,
    reference_logprobs,
    response_forward,
    trim_left_padding,
)

__all__ = [
    "collect_experience",
    "hf_generation_config",
    "micro_batches",
    "uses_sampler_logprobs",
    "exact_float32",
]


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Consecutive slices of `size` rows covering `n` rows (one slice when size is None)."""
    size = size or n
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def hf_generation_config(cfg, tokenizer) -> HFGenerationConfig:
    """A transformers GenerationConfig for sampling rollouts from our `GenerationConfig`."""
    return HFGenerationConfig(
        do_sample=True,
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens or None,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def _score(module, batch, rollout: Rollout, responses: list[str]) -> torch.Tensor:
    """Raw sequence rewards Float[B] from the RM export or the reward callable."""
    cfg = module.reward_cfg
    prompts = list(batch["prompt_text"])
    if module.reward_fn is not None:
        scores = module.reward_fn(prompts, responses)  # a `scorers.BatchScorer`
        return torch.tensor(scores, dtype=torch.float32, device=rollout.query_ids.device)
    if module.reward_tokenizer is not None:  # different vocabulary: score re-tokenised text
        eos = module.reward_tokenizer.eos_token or ""
        has_eos = ends_with_eos(rollout.response_ids, rollout.response_mask, module.eos_ids)
        texts = [
            p + module.response_separator + r + (eos if e else "")
            for p, r, e in zip(prompts, responses, has_eos.tolist())
        ]
        scores = score_texts(
            module.reward_model, module.reward_tokenizer, texts, batch_size=cfg.micro_batch_size
        )
        return torch.tensor(scores, dtype=torch.float32, device=rollout.query_ids.device)
    out = []
    for part in micro_batches(len(rollout), cfg.micro_batch_size):
        sub = rollout.select(torch.arange(len(rollout))[part])
        out.append(score_rows(module.reward_model, sub.input_ids, sub.attention_mask))
    return torch.cat(out)  # [B]


def _shape_scores(module, raw: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """Normalise, penalise a missing EOS, clip. Float[B] → Float[B]."""
    cfg = module.reward_cfg
    scores = raw.clone()
    if cfg.normalize == "stats" and module.reward_stats:
        scores = normalise(scores, module.reward_stats)
    elif cfg.normalize == "running":
        module.running.update(raw, module_ranks(module))  # moments of every rank's rewards
        scores = (scores - module.running.mean) / max(module.running.std, 1e-6)
    if cfg.missing_eos_penalty is not None:
        has_eos = ends_with_eos(rollout.response_ids, rollout.response_mask, module.eos_ids)  # [B]
        scores = scores - cfg.missing_eos_penalty * (~has_eos).float()
    if cfg.clip is not None:
        scores = scores.clamp(-cfg.clip, cfg.clip)
    return scores


def uses_sampler_logprobs(module) -> bool:
    """Whether π_old comes from the sampler's logits (no policy forward in step 3).

    `generation.sampler_logprobs` true/false decides; null (default) = only when the policy
    computes in exact float32 (`exact_float32`), where the KV-cached sampler and the training
    forward agree to ~1e-6 — in bfloat16 their ratio is off by ~1e-3 on average (8e-3 at worst on
    a 4-layer model), a bias PPO would train on. Never with the exact-KL estimator (it needs the
    policy's logits beside the reference's) or a shared value head (it needs its hidden states).
    """
    if module.kl_cfg.estimator == "full" or module.value_head is not None:
        return False
    choice = module.generation_cfg.sampler_logprobs
    return exact_float32(module.policy) if choice is None else bool(choice)


def exact_float32(model) -> bool:
    """True when `model` computes in float32: every parameter float32, no autocast on its device,
    and full-precision float32 matmuls (`torch.set_float32_matmul_precision("highest")`; TF32 or
    bf16 internal matmuls make the sampler and the trainer disagree like 16-bit does)."""
    params = list(model.parameters())
    return (
        all(p.dtype == torch.float32 for p in params)
        and not torch.is_autocast_enabled(params[0].device.type)
        and torch.get_float32_matmul_precision() == "highest"
    )


def _logprobs_values_kl(module, rollout: Rollout) -> None:
    """Fill ref log-probs, per-token KL, values and (unless the sampler gave them) old log-probs
    and entropy, in rollout micro-batches."""
    gen, kl_cfg = module.generation_cfg, module.kl_cfg
    full = kl_cfg.estimator == "full"
    shared = module.value_head is not None
    have_old = rollout.logprobs is not None
    parts = {k: [] for k in ("logprobs", "ref_logprobs", "entropy", "kl", "values")}
    for part in micro_batches(len(rollout), gen.micro_batch_size):
        sub = rollout.select(torch.arange(len(rollout))[part])
        with reference_context(module.policy, module.reference) as ref_model:
            ref_logp, ref_logits = reference_logprobs(
                ref_model, sub, temperature=gen.temperature, keep_logits=full
            )
        if have_old:
            out = {"logprobs": sub.logprobs, "entropy": sub.entropy}
        else:
            out = response_forward(
                module.policy,
                sub,
                temperature=gen.temperature,
                ref_logits=ref_logits,
                with_hidden=shared,
            )
        mask = sub.response_mask
        if full:
            kl = out["kl"]
        else:
            kl = kl_penalty(out["logprobs"], ref_logp, kl_cfg.estimator) * mask  # [b, R]
        if shared:
            values = module.value_head(out["hidden"]) * mask  # [b, R]
        else:
            values = critic_values(module.critic, sub)  # [b, R]
        for key, value in (
            ("logprobs", out["logprobs"]),
            ("ref_logprobs", ref_logp),
            ("entropy", out["entropy"]),
            ("kl", kl),
            ("values", values),
        ):
            parts[key].append(value.float())
    for key, chunks in parts.items():
        setattr(rollout, key, torch.cat(chunks))


@torch.no_grad()
def collect_experience(module, batch: dict) -> tuple[Rollout, dict]:
    """Steps 1–4. Returns the rollout (advantages and returns filled) and diagnostics
    (`responses`, `prompts`, `gold`, timings)."""
    info: dict = {}
    models = [m for m in (module.policy, module.critic, module.value_head) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        # 1. rollout: sample responses (HF generate, KV cache, left-padded prompts)
        t0 = time.perf_counter()
        query_ids, query_mask = trim_left_padding(batch["input_ids"], batch["attention_mask"])
        samples = generate(
            module.policy,
            query_ids,
            query_mask,
            generation_config=module.hf_generation,
            eos_token_id=module.eos_ids,
            pad_token_id=module.tokenizer.pad_token_id,
            micro_batch_size=module.generation_cfg.micro_batch_size,
            with_logprobs=uses_sampler_logprobs(module),
            temperature=module.generation_cfg.temperature,
        )
        rollout = Rollout(
            query_ids,
            query_mask,
            samples.response_ids,
            samples.response_mask,
            logprobs=samples.logprobs,  # None unless π_old comes from the sampler
            entropy=samples.entropy,
        )
        info["rollout_s"] = time.perf_counter() - t0

        # 2. score: RM export or reward callable; normalise, missing-EOS penalty, clip
        t0 = time.perf_counter()
        texts = response_texts(
            module.tokenizer, rollout.response_ids, rollout.response_mask, module.eos_ids
        )
        raw = _score(module, batch, rollout, texts)  # [B]
        rollout.scores_raw = raw
        rollout.scores = _shape_scores(module, raw, rollout)  # [B]
        if module.gold_fn is not None:
            info["gold"] = module.gold_fn(list(batch["prompt_text"]), texts)
        info["responses"], info["prompts"] = texts, list(batch["prompt_text"])
        info["score_s"] = time.perf_counter() - t0

        # 3. reference log-probs, per-token KL, values (+ old log-probs, entropy if not sampled)
        t0 = time.perf_counter()
        _logprobs_values_kl(module, rollout)
        info["logprob_s"] = time.perf_counter() - t0
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)

    _advantages(module, rollout)  # 4. advantages
    return rollout, info


def _advantages(module, rollout: Rollout) -> None:
    """Step 4: KL-penalised per-token rewards → GAE(γ, λ) → whitening over the valid tokens of
    every data-parallel rank. Fills `rewards`, `returns` and `advantages` (Float[B, R] each)."""
    upd = module.update_cfg
    beta = module.kl_ctl.value if module.kl_cfg.mode == "reward" else 0.0
    rollout.rewards = kl_penalised_rewards(rollout.scores, rollout.kl, rollout.response_mask, beta)
    adv, ret = gae(rollout.rewards, rollout.values, rollout.response_mask, upd.gamma, upd.lam)
    if upd.whiten_advantages:
        adv = whiten(adv, rollout.response_mask, ranks=module_ranks(module))
    rollout.returns, rollout.advantages = ret, adv
