"""Step 5 of a PPO iteration: `ppo_epochs` × shuffled minibatches × micro-batches.

`ppo_update(models, exp, upd, kl, gen, kl_coef=..., ops=..., next_ptx=...)` trains on an
`Experience` and returns a typed `UpdateStats`. What only the training framework can do comes
through `ops` (an `UpdateOps`: backward, optimizer/scheduler steps, gradient sync control, the
cross-rank reductions); `modules.lightning_ops.LightningOps` implements it with the Lightning-
wrapped optimizers (so `on_before_optimizer_step` clips after AMP unscaling and `global_step`
counts), `LocalOps` with plain torch.

Per minibatch: optional PPO-ptx micro-batches add γ_ptx·NLL on demonstrations; every PPO
micro-batch's losses are divided by the minibatch's valid-token count (so the accumulated gradient
is the minibatch token-mean whatever the micro-batch size; other `update.loss_aggregation`s
weight the tokens by minibatch counts the same way, `ppo.losses.token_weights`) and
backpropagated; then the optimizers and schedulers step. Before the very first optimizer step the
policy must reproduce the rollout's log-probs (ratio π/π_old = 1). Without a critic
(`critic.kind: none`) there is no value loss. With k > 1 samples per prompt the minibatches are
drawn as whole groups (`ppo.minibatches.group_minibatches`): the samples of a prompt are never split.

With `compute.reuse_critic_forward` (default) epoch 0's minibatches are drawn before step 3
(`ppo.minibatches.plan_first_micro_batch`), step 3 runs the critic on the rows of the update's first micro-batch
with autograd on, and the update takes those values (`FirstMicroBatch.values`) instead of running
the same forward again: before the first optimizer step the critic's parameters are the ones step
3 used, and dropout is off in every PPO model, so given step 3's outputs the update is
bit-identical (one critic forward of a micro-batch less per iteration; step 3's own values of the
other rows come from other micro-batches, which may round differently). Nothing between step 3
and the update draws random numbers, so the minibatches are the ones the update would draw.

Under DDP the divisor is the minibatch's valid-token count averaged over ranks (DDP averages the
gradients, so the result is the token-mean of the global minibatch), and the minibatch
statistics, the ratio check and the approx-KL early stop are reduced over ranks
(`ppo.distributed`), so every rank takes the same decisions. PPO-ptx runs first in each
minibatch under `ops.no_sync()` (it does not reach the critic); every rank draws the same
demonstration batch, so its term equals the single-process one.

References: Schulman et al. 2017 (PPO); Ouyang et al. 2022 (PPO-ptx); Huang et al. 2024,
"The N+ Implementation Details of RLHF with PPO" (ratio-at-start check, approx-KL early stop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch

from rlhf_lightning.kernels import kl_penalty, token_logprobs
from rlhf_lightning.ppo import minibatches
from rlhf_lightning.ppo.config import GenerationConfig, KLConfig, UpdateConfig
from rlhf_lightning.ppo.distributed import LOCAL, CrossRank
from rlhf_lightning.ppo.experience import Experience
from rlhf_lightning.ppo.logprobs import critic_values, reference_logprobs, response_forward
from rlhf_lightning.ppo.losses import (
    PPOStats,
    entropy_bonus,
    kl_loss,
    policy_loss,
    ptx_loss,
    token_weights,
    value_loss,
)
from rlhf_lightning.ppo.models import PPOModels
from rlhf_lightning.ppo.rollout import micro_batches
from rlhf_lightning.ppo.stats import UpdateStats

__all__ = [
    "UpdateOps",
    "LocalOps",
    "UpdateStats",
    "ppo_update",
    "RatioMismatchError",
]


class RatioMismatchError(RuntimeError):
    """The update pass does not reproduce the rollout's log-probs."""


class UpdateOps(Protocol):
    """What the update needs from the training framework."""

    ranks: CrossRank
    """Cross-rank reductions (`LOCAL` in one process)."""

    def zero_grad(self) -> None:
        """Zero every optimizer's gradients (set to None)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss` (with AMP scaling / DDP gradient sync where they apply)."""

    def step(self) -> None:
        """Step every optimizer, zero its gradients, step its scheduler."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        """A context whose backwards do not synchronise gradients across ranks."""


class LocalOps:
    """`UpdateOps` on plain torch optimizers and schedulers in one process (tests, scripts)."""

    def __init__(self, optimizers: list, schedulers: list | None = None, ranks: CrossRank = LOCAL):
        self.optimizers = list(optimizers)
        self.schedulers = list(schedulers) if schedulers else [None] * len(self.optimizers)
        self.ranks = ranks

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        for opt, sched in zip(self.optimizers, self.schedulers):
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _exact_kl_reference(models: PPOModels, micro: Experience, kl_cfg: KLConfig, gen):
    """Reference logits Float[b, R, V] for the exact-KL loss term (`kl.mode: loss`,
    `estimator: full`), else None."""
    if kl_cfg.mode != "loss" or kl_cfg.estimator != "full":
        return None
    with torch.no_grad(), models.reference_model() as ref_model:
        _, ref_logits = reference_logprobs(
            ref_model, micro, temperature=gen.temperature, keep_logits=True
        )
    return ref_logits


def _value_term(models, micro, out, n_tokens, upd, weights, stats, values) -> torch.Tensor | None:
    """Clipped value loss of one micro-batch (None without a critic); its stats into `stats`.
    `values` Float[b, R]: the critic's values computed already (step 3's graph), else None."""
    shared = models.value_head is not None
    if not shared and models.critic is None:
        return None
    if shared:
        values = models.value_head(out["hidden"])
    elif values is None:
        values = critic_values(models.critic, micro)
    elif values.shape != micro.response_mask.shape:
        raise ValueError(
            f"step 3's critic values {tuple(values.shape)} are not those of the update's first "
            f"micro-batch {tuple(micro.response_mask.shape)}: pass the `FirstMicroBatch` that "
            "planned them"
        )
    v_loss, v_stats = value_loss(
        values,
        micro.old_values,
        micro.returns,
        micro.response_mask,
        n_tokens,
        upd.value_clip,
        weights=weights,
    )
    stats.add(v_stats, "val/")
    return v_loss


def _kl_term(out, micro, kl_cfg: KLConfig, n_tokens, weights) -> torch.Tensor:
    """KL-to-reference loss term of one micro-batch (`kl.mode: loss`)."""
    if kl_cfg.estimator == "full":
        kl = out["kl"]
    else:
        kl = kl_penalty(out["logprobs"], micro.ref_logprobs, kl_cfg.estimator)
    return kl_loss(kl, micro.response_mask, n_tokens, weights=weights)


def _micro_losses(
    models: PPOModels,
    micro: Experience,
    counts: tuple[float, float],
    stats: PPOStats,
    cfg: tuple[UpdateConfig, KLConfig, GenerationConfig, float],
    ops: UpdateOps,
    values: torch.Tensor | None = None,
) -> float:
    """Forward/backward of one micro-batch; returns Σ|ratio − 1| over its valid tokens.
    `counts` = (valid tokens, responses) of the whole minibatch; `values` Float[b, R] = the
    critic's values from step 3's graph (`FirstMicroBatch`), else the critic runs here."""
    upd, kl_cfg, gen, kl_coef = cfg
    mask = micro.response_mask
    n_tokens, n_seqs = counts
    weights = None  # token_mean: mask / n_tokens inside the losses
    if upd.loss_aggregation != "token_mean":
        weights = token_weights(mask, upd.loss_aggregation, n_tokens, n_seqs, gen.max_new_tokens)
    out = response_forward(
        models.policy,
        micro,
        temperature=gen.temperature,
        ref_logits=_exact_kl_reference(models, micro, kl_cfg, gen),
        with_hidden=models.value_head is not None,
    )
    logp = out["logprobs"]  # [b, R]
    pg_loss, pg_stats = policy_loss(
        logp,
        micro.old_logprobs,
        micro.advantages,
        mask,
        n_tokens,
        upd.clip_eps,
        upd.dual_clip,
        weights=weights,
    )
    entropy = entropy_bonus(out["entropy"], mask, n_tokens)  # token mean (logged)
    if weights is not None:
        entropy_term = entropy_bonus(out["entropy"], mask, n_tokens, weights)
    else:
        entropy_term = entropy
    loss = pg_loss - upd.ent_coef * entropy_term
    terms = {"loss/policy": pg_loss, "policy/entropy": entropy}
    v_loss = _value_term(models, micro, out, n_tokens, upd, weights, stats, values)
    if v_loss is not None:
        loss = loss + upd.vf_coef * v_loss
        terms["loss/value"] = v_loss
    if kl_cfg.mode == "loss":
        terms["loss/kl"] = k_loss = _kl_term(out, micro, kl_cfg, n_tokens, weights)
        loss = loss + kl_coef * k_loss
    ops.backward(loss)
    terms["loss/total"] = loss
    stats.add({k: v.detach() for k, v in terms.items()})
    stats.add(pg_stats, "policy/")
    with torch.no_grad():
        ratio = torch.exp((logp - micro.old_logprobs) * mask)  # [b, R]
        return float(((ratio - 1).abs() * mask).sum())


def _ptx_backward(
    models: PPOModels, batch: dict, upd: UpdateConfig, stats: PPOStats, ops: UpdateOps
) -> None:
    """PPO-ptx: γ_ptx · SFT NLL on one demonstration batch, in micro-batches."""
    labels = batch["labels"][:, 1:]  # [B, T-1] next-token targets
    valid = labels != -100  # [B, T-1]
    n_ptx = int(valid.sum())
    if n_ptx == 0:
        return
    for part in micro_batches(len(labels), upd.micro_batch_size):
        ids, attn = batch["input_ids"][part], batch["attention_mask"][part]
        first = int(valid[part].any(0).long().argmax())  # LM head from the first labelled column
        out = models.policy(
            input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=ids.shape[1] - first
        )
        target, keep = labels[part][:, first:], valid[part][:, first:]  # [b, T-1-first]
        logp = token_logprobs(out.logits[:, :-1], target, mask=keep)  # [b, T-1-first]
        loss = ptx_loss(logp, keep, n_ptx)
        ops.backward(upd.ptx_coef * loss)
        stats.add({"loss/ptx": loss.detach()})


def _minibatch(models, mb, stats, cfg, ops, next_ptx, first_values=None) -> tuple[float, float]:
    """PPO-ptx then the PPO micro-batches of one minibatch: (Σ|ratio − 1|, global token count).
    `first_values`: the first micro-batch's critic values from step 3 (with graph), or None."""
    upd = cfg[0]
    n_tokens = _global_count(ops.ranks, mb.response_mask.sum())
    n_seqs = _global_count(ops.ranks, torch.tensor(float(len(mb))))
    if (
        upd.ptx_coef > 0 and next_ptx is not None
    ):  # first: the PPO backwards below also average its gradients
        with ops.no_sync():
            _ptx_backward(models, next_ptx(), upd, stats, ops)
    deviation = 0.0
    for i, part in enumerate(micro_batches(len(mb), upd.micro_batch_size)):
        micro = mb.select(torch.arange(len(mb), device=mb.response_ids.device)[part])
        values = first_values if i == 0 else None
        deviation += _micro_losses(models, micro, (n_tokens, n_seqs), stats, cfg, ops, values)
    return deviation, n_tokens


def ppo_update(
    models: PPOModels,
    exp: Experience,
    upd: UpdateConfig,
    kl: KLConfig,
    gen: GenerationConfig,
    *,
    kl_coef: float,
    ops: UpdateOps,
    next_ptx: Callable[[], dict] | None = None,
    first_micro: minibatches.FirstMicroBatch | None = None,
) -> UpdateStats:
    """Step 5: the PPO epochs on `exp`; `next_ptx()` gives a demonstration batch (PPO-ptx on);
    `first_micro`: epoch 0's minibatches and step 3's critic values of the first micro-batch
    (`ppo.minibatches.plan_first_micro_batch`), else the update draws and computes them itself."""
    minibatches.check_minibatches(exp.group, len(exp), upd)
    if first_micro is not None:
        minibatches.check_first_micro(first_micro, len(exp), upd)
    stats, cfg = PPOStats(), (upd, kl, gen, kl_coef)
    epochs_done, early_stop, first = 0, False, True
    ops.zero_grad()
    for epoch in range(upd.ppo_epochs):
        if epoch == 0 and first_micro is not None:
            chunks = first_micro.minibatches
        else:
            chunks = minibatches.group_minibatches(
                exp.group, len(exp), upd.num_minibatches, exp.query_ids.device
            )
        for chunk in chunks:
            reused = first_micro.values if first and first_micro is not None else None
            mb = exp.select(chunk)
            deviation, n_tokens = _minibatch(models, mb, stats, cfg, ops, next_ptx, reused)
            if first:
                mean_dev = _global_count(ops.ranks, torch.tensor(deviation)) / n_tokens
                _check_ratio(mean_dev, upd.ratio_check_tol)
                first = False
            ops.step()
            closed = stats.end_minibatch(ops.ranks)  # global: the early stop agrees on every rank
            if upd.target_kl is not None and closed["policy/approxkl"] > upd.target_kl:
                early_stop = True
                break
        epochs_done = epoch + 1
        if early_stop:
            break
    return UpdateStats.from_means(
        stats.means(), stats.first.get("policy/ratio_mean", 1.0), epochs_done, early_stop
    )


def _global_count(ranks: CrossRank, local: torch.Tensor) -> float:
    """A per-rank count (or sum) averaged over ranks: DDP averages gradients, so dividing each
    rank's token sum by this gives Σ over all ranks / total valid tokens (exact token-mean)."""
    return float(ranks.mean_over_ranks(local.double()))


def _check_ratio(mean_abs_dev: float, tol: float | None) -> None:
    """Fail loudly when π/π_old ≠ 1 before the first optimizer step (`mean_abs_dev` is over every
    rank, so all ranks raise together, with the same message)."""
    if tol is None or mean_abs_dev <= tol:
        return
    raise RatioMismatchError(
        f"ppo/policy/ratio_at_start: mean |π/π_old − 1| = {mean_abs_dev:.3g} > "
        f"model.update.ratio_check_tol={tol} before any update — the "
        "training forward does not reproduce the rollout log-probs; check dropout, temperature, "
        "dtype/autocast and padding/position ids"
    )
