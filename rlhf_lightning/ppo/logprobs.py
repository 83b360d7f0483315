"""Step 3 of a PPO iteration: old-policy and reference log-probs, entropy, per-token KL, values.

`logprobs_values(models, rollout, gen, kl)` runs, in rollout micro-batches, one reference forward,
one policy forward (skipped when the sampler gave π_old, `uses_sampler_logprobs`) and the critic
(or reads the shared value head from the policy's hidden states), and returns a frozen
`TokenStats` of Float[B, R] tensors, 0 on padding. A separate critic runs after the reference,
in the same micro-batches; with `graph_rows` (the update's first micro-batch,
`ppo.minibatches.plan_first_micro_batch`) it runs those rows on their own, last, in train mode with
autograd on, and `TokenStats.values_graph` keeps that forward for the update to train on. The
update (step 5) reuses `response_forward`,
`reference_logprobs` and `critic_values`; all [query | response] forwards go through
`_response_logits` / `critic_values`, which run each model as its `ppo.compile.plan_of` says
(k > 1 groups packed so that a prompt is computed once, `ppo.packing`; compiled or eager).

References: Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (temperature-
consistent log-probs, position ids); Schulman 2020, "Approximating KL Divergence" (k1/k2/k3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from rlhf_lightning.kernels import kl_penalty, token_logprobs, token_stats
from rlhf_lightning.models.masks import position_ids
from rlhf_lightning.ppo import packing, varlen
from rlhf_lightning.ppo.compile import plan_of
from rlhf_lightning.ppo.config import GenerationConfig, KLConfig
from rlhf_lightning.ppo.models import PPOModels
from rlhf_lightning.ppo.rollout import Rollout, micro_batches

__all__ = [
    "TokenStats",
    "logprobs_values",
    "response_forward",
    "reference_logprobs",
    "critic_values",
    "uses_sampler_logprobs",
    "exact_float32",
]


@dataclass(frozen=True)
class TokenStats:
    """Step 3's output. B = prompts, R = response width; float32, 0 on padding."""

    logprobs: torch.Tensor
    """Float[B, R] log π_old(a_t) at the sampling temperature."""
    ref_logprobs: torch.Tensor
    """Float[B, R] log π_ref(a_t)."""
    entropy: torch.Tensor
    """Float[B, R] entropy of π_old at each step."""
    kl: torch.Tensor
    """Float[B, R] per-token KL estimate (`kl.estimator`), or the exact KL with `full`."""
    values: torch.Tensor | None
    """Float[B, R] critic values V(s_t); None without a critic (`critic.kind: none`)."""
    values_graph: torch.Tensor | None = None
    """Float[b, R] V(s_t) of the `graph_rows` step 3 was given (in that order) with the critic's
    autograd graph, for the update's first micro-batch; None when none were asked for."""


def uses_sampler_logprobs(models: PPOModels, gen: GenerationConfig, kl: KLConfig) -> bool:
    """Whether π_old comes from the sampler's logits (no policy forward in step 3).

    `generation.sampler_logprobs` true/false decides; null (default) = only when the policy
    computes in exact float32 (`exact_float32`), where the KV-cached sampler and the training
    forward agree to ~1e-6 — in bfloat16 their ratio is off by ~1e-3 on average (8e-3 at worst on
    a 4-layer model), a bias PPO would train on. Never with the exact-KL estimator (it needs the
    policy's logits beside the reference's) or a shared value head (it needs its hidden states).
    """
    if kl.estimator == "full" or models.value_head is not None:
        return False
    choice = gen.sampler_logprobs
    return exact_float32(models.policy) if choice is None else bool(choice)


def exact_float32(model: nn.Module) -> bool:
    """True when `model` computes in float32: every parameter float32, no autocast on its device,
    and full-precision float32 matmuls (`torch.set_float32_matmul_precision("highest")`; TF32 or
    bf16 internal matmuls make the sampler and the trainer disagree like 16-bit does)."""
    params = list(model.parameters())
    return (
        all(p.dtype == torch.float32 for p in params)
        and not torch.is_autocast_enabled(params[0].device.type)
        and torch.get_float32_matmul_precision() == "highest"
    )


def _response_logits(model: nn.Module, rollout: Rollout, with_hidden: bool):
    """Forward `[query | response]`: (logits Float[B, R, V] predicting each response token,
    last hidden states Float[B, R, H] at those positions or None). Runs as `plan_of(model)`
    says: group-packed (`ppo.packing`) when rows share prompts, else padded with positions from
    the mask and only the last R + 1 positions through the LM head; compiled or eager."""
    plan = plan_of(model)
    group = getattr(rollout, "group", None)
    route = plan.route(group)
    if route == "groups":
        packed = packing.pack_rows(rollout, group)
        logits, hidden = packing.packed_lm(model, packed, plan.trunk_call)  # [B, R, V], [B, R, H]
        return logits, (hidden if with_hidden else None)
    if route == "varlen":
        logits, hidden = varlen.varlen_lm(model, rollout, plan.trunk_call)  # [B, R, V], [B, R, H]
        return logits, (hidden if with_hidden else None)
    steps = rollout.response_ids.shape[1]
    attention = rollout.attention_mask  # [B, P + R]
    extra = {"output_hidden_states": True} if with_hidden else {}
    out = plan.call(
        input_ids=rollout.input_ids,
        attention_mask=attention,
        position_ids=position_ids(attention),
        logits_to_keep=steps + 1,
        use_cache=False,
        **extra,
    )
    hidden = out.hidden_states[-1][:, -steps - 1 : -1] if with_hidden else None  # [B, R, H]
    return out.logits[:, :-1], hidden  # [B, R, V]


def response_forward(
    model: nn.Module,
    rollout: Rollout,
    *,
    temperature: float,
    ref_logits: torch.Tensor | None = None,
    with_hidden: bool = False,
    return_logits: bool = False,
) -> dict[str, torch.Tensor]:
    """Forward `[query | response]` and return statistics of the response tokens.

    Returns a dict with `logprobs` Float[B, R], `entropy` Float[B, R], `kl` Float[B, R] (exact
    KL to `ref_logits` Float[B, R, V], only when given), optionally `hidden` Float[B, R, H] (last
    hidden state at the positions that predict each token) and `logits` Float[B, R, V].
    All statistics come from `rlhf_lightning.kernels.token_stats` (one pass over the vocabulary).
    """
    logits, hidden = _response_logits(model, rollout, with_hidden)  # [B, R, V], [B, R, H]
    mask = rollout.response_mask.bool()  # [B, R]
    logp, entropy, kl = token_stats(
        logits, rollout.response_ids, ref_logits, temperature=temperature, mask=mask
    )  # each [B, R]
    result = {"logprobs": logp, "entropy": entropy, "kl": kl}
    if with_hidden:
        result["hidden"] = hidden  # [B, R, H]
    if return_logits:
        result["logits"] = logits
    return result


def reference_logprobs(
    model: nn.Module, rollout: Rollout, *, temperature: float, keep_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π_ref of the response tokens (Float[B, R]) and, when asked, the logits Float[B, R, V]."""
    logits, _ = _response_logits(model, rollout, with_hidden=False)  # [B, R, V]
    logp = token_logprobs(
        logits, rollout.response_ids, temperature=temperature, mask=rollout.response_mask.bool()
    )  # [B, R]
    return logp, (logits if keep_logits else None)


def critic_values(critic: nn.Module, rollout: Rollout) -> torch.Tensor:
    """Values V(s_t) of a separate critic (`ppo.models.CriticModel`) for the response steps
    (group-packed or padded, compiled or eager, as `plan_of(critic)` says)."""
    plan = plan_of(critic)
    group = getattr(rollout, "group", None)
    route = plan.route(group)
    if route == "groups":
        packed = packing.pack_rows(rollout, group)
        values = packing.packed_values(critic, packed, plan.trunk_call)  # [B, R]
    elif route == "varlen":
        values = varlen.varlen_values(critic, rollout, plan.trunk_call)  # [B, R]
    else:
        steps = rollout.response_ids.shape[1]
        values = plan.call(rollout.input_ids, rollout.attention_mask)[:, -steps - 1 : -1]
    return values * rollout.response_mask  # [B, R]


def _micro_batch_stats(models: PPOModels, sub: Rollout, gen: GenerationConfig, kl_cfg: KLConfig):
    """The five [b, R] statistics of one micro-batch, in `TokenStats` field order (values None
    with a separate critic: `_separate_critic_values` runs it)."""
    full = kl_cfg.estimator == "full"
    shared = models.value_head is not None
    with models.reference_model() as ref_model:
        ref_logp, ref_logits = reference_logprobs(
            ref_model, sub, temperature=gen.temperature, keep_logits=full
        )
    if sub.sampled is not None:
        out = {"logprobs": sub.sampled.logprobs, "entropy": sub.sampled.entropy}
    else:
        out = response_forward(
            models.policy,
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
    values = models.value_head(out["hidden"]) * mask if shared else None  # [b, R]
    return out["logprobs"], ref_logp, out["entropy"], kl, values


@contextlib.contextmanager
def _train_mode(model: nn.Module) -> Iterator[None]:
    """`model` in train mode inside the block (its mode restored after)."""
    mode = model.training
    model.train()
    try:
        yield
    finally:
        model.train(mode)


def _separate_critic_values(
    critic: nn.Module, rollout: Rollout, micro_batch_size: int | None, graph_rows
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Values Float[B, R] of every row (no graph) and, for `graph_rows` (Long[b] or None), those
    rows' values Float[b, R] computed as the update computes them: train mode, autograd on."""
    device = rollout.response_ids.device
    values = torch.zeros(rollout.response_mask.shape, dtype=torch.float32, device=device)
    rest, graph = torch.arange(len(rollout), device=device), None
    if graph_rows is not None:
        rest = rest[~torch.isin(rest, graph_rows)]
    for part in micro_batches(len(rest), micro_batch_size) if len(rest) else []:
        values[rest[part]] = critic_values(critic, rollout.select(rest[part])).float()
    if graph_rows is not None:  # last: its activations are held from here to the update
        with torch.enable_grad(), _train_mode(critic):
            graph = critic_values(critic, rollout.select(graph_rows))  # [b, R]
        values[graph_rows] = graph.detach().float()
    return values, graph


@torch.no_grad()
def logprobs_values(
    models: PPOModels,
    rollout: Rollout,
    gen: GenerationConfig,
    kl: KLConfig,
    graph_rows: torch.Tensor | None = None,
) -> TokenStats:
    """Step 3: `TokenStats` of the rollout in `gen.micro_batch_size` micro-batches (π_old from the
    sampler when the rollout carries it, else a policy forward; no values without a critic).
    `graph_rows` Long[b]: rows whose critic forward is kept with its graph (`values_graph`; only
    with a separate critic)."""
    parts: list[list[torch.Tensor | None]] = [[] for _ in range(5)]
    for part in micro_batches(len(rollout), gen.micro_batch_size):
        sub = rollout.select(torch.arange(len(rollout))[part])
        for chunks, value in zip(parts, _micro_batch_stats(models, sub, gen, kl)):
            chunks.append(None if value is None else value.float())
    joined = [None if chunks[0] is None else torch.cat(chunks) for chunks in parts]
    graph = None
    if models.critic is not None and models.value_head is None:
        joined[4], graph = _separate_critic_values(
            models.critic, rollout, gen.micro_batch_size, graph_rows
        )
    return TokenStats(*joined, values_graph=graph)  # each [B, R] (values None without a critic)
