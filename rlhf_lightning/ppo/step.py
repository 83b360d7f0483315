"""Step 5 of a PPO iteration: `ppo_epochs` × shuffled minibatches × micro-batches.

Per minibatch: optional PPO-ptx micro-batches add γ_ptx·NLL on demonstrations; every PPO
micro-batch's losses are divided by the minibatch's valid-token count (so the accumulated gradient
is the minibatch token-mean whatever the micro-batch size), backpropagated with
`manual_backward`; then the optimizers and schedulers step (gradients are clipped with `clip_gradients` in the module's
`on_before_optimizer_step` hook, which Lightning runs after unscaling 16-mixed gradients).
Before the very first optimizer step the policy must reproduce the rollout's log-probs
(ratio π/π_old = 1).

Under DDP the divisor is the minibatch's valid-token count averaged over ranks (DDP averages the
gradients, so the result is the token-mean of the global minibatch), and the minibatch
statistics, the ratio check and the approx-KL early stop are reduced over ranks
(`ppo.distributed`), so every rank takes the same decisions. PPO-ptx runs first in each
minibatch under DDP's `no_sync()` (it does not reach the critic); every rank draws the same
demonstration batch, so its term equals the single-process one.

References: Schulman et al. 2017 (PPO); Ouyang et al. 2022 (PPO-ptx); Huang et al. 2024,
"The N+ Implementation Details of RLHF with PPO" (ratio-at-start check, approx-KL early stop).
"""

from __future__ import annotations

import contextlib

import torch

from rlhf_lightning.kernels import kl_penalty, token_logprobs
from rlhf_lightning.ppo.distributed import CrossRank, module_ranks
from rlhf_lightning.ppo.experience import micro_batches
from rlhf_lightning.ppo.losses import (
    PPOStats,
    entropy_bonus,
    kl_loss,
    policy_loss,
    ptx_loss,
    value_loss,
)
from rlhf_lightning.ppo.models import reference_context
from rlhf_lightning.ppo.rollout import Rollout, critic_values, reference_logprobs, response_forward

__all__ = ["ppo_update", "RatioMismatchError"]


class RatioMismatchError(RuntimeError):
    """The update pass does not reproduce the rollout's log-probs."""


def _micro_losses(module, micro: Rollout, n_tokens: int, stats: PPOStats) -> float:
    """Forward/backward of one micro-batch; returns Σ|ratio − 1| over its valid tokens."""
    upd, kl_cfg, gen = module.update_cfg, module.kl_cfg, module.generation_cfg
    mask = micro.response_mask
    ref_logits = None
    kl_in_loss = kl_cfg.mode == "loss"
    if kl_in_loss and kl_cfg.estimator == "full":
        with torch.no_grad(), reference_context(module.policy, module.reference) as ref_model:
            _, ref_logits = reference_logprobs(
                ref_model, micro, temperature=gen.temperature, keep_logits=True
            )
    shared = module.value_head is not None
    out = response_forward(
        module.policy, micro, temperature=gen.temperature, ref_logits=ref_logits, with_hidden=shared
    )
    logp = out["logprobs"]  # [b, R]
    pg_loss, pg_stats = policy_loss(
        logp, micro.logprobs, micro.advantages, mask, n_tokens, upd.clip_eps, upd.dual_clip
    )
    values = module.value_head(out["hidden"]) if shared else critic_values(module.critic, micro)
    v_loss, v_stats = value_loss(
        values, micro.values, micro.returns, mask, n_tokens, upd.value_clip
    )
    entropy = entropy_bonus(out["entropy"], mask, n_tokens)
    loss = pg_loss + upd.vf_coef * v_loss - upd.ent_coef * entropy
    terms = {"loss/policy": pg_loss, "loss/value": v_loss, "policy/entropy": entropy}
    if kl_in_loss:
        kl = (
            out["kl"]
            if kl_cfg.estimator == "full"
            else kl_penalty(logp, micro.ref_logprobs, kl_cfg.estimator)
        )
        k_loss = kl_loss(kl, mask, n_tokens)
        loss = loss + module.kl_ctl.value * k_loss
        terms["loss/kl"] = k_loss
    module.manual_backward(loss)
    terms["loss/total"] = loss
    stats.add({k: v.detach() for k, v in terms.items()})
    stats.add(pg_stats, "policy/")
    stats.add(v_stats, "val/")
    with torch.no_grad():
        ratio = torch.exp((logp - micro.logprobs) * mask)  # [b, R]
        return float(((ratio - 1).abs() * mask).sum())


def _ptx_backward(module, stats: PPOStats) -> None:
    """PPO-ptx: γ_ptx · SFT NLL on one demonstration batch, in micro-batches."""
    batch = module.next_ptx_batch()
    labels = batch["labels"][:, 1:]  # [B, T-1] next-token targets
    valid = labels != -100  # [B, T-1]
    n_ptx = int(valid.sum())
    if n_ptx == 0:
        return
    for part in micro_batches(len(labels), module.update_cfg.micro_batch_size):
        ids, attn = batch["input_ids"][part], batch["attention_mask"][part]
        logits = module.policy(input_ids=ids, attention_mask=attn, use_cache=False).logits
        logp = token_logprobs(logits[:, :-1], labels[part], mask=valid[part])  # [b, T-1]
        loss = ptx_loss(logp, valid[part], n_ptx)
        module.manual_backward(module.update_cfg.ptx_coef * loss)
        stats.add({"loss/ptx": loss.detach()})


def _step_optimizers(module) -> None:
    """Step every optimizer (gradients are clipped in `PPOModule.on_before_optimizer_step`, i.e.
    after a 16-mixed loss scaler has unscaled them) and its scheduler; zero the gradients."""
    for opt, sched in zip(module.ppo_optimizers(), module.ppo_schedulers()):
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()


def ppo_update(module, rollout: Rollout) -> dict[str, float]:
    """Run the PPO epochs on `rollout`; returns averaged statistics (keys without `ppo/`)."""
    upd = module.update_cfg
    size = len(rollout)
    if not 1 <= upd.num_minibatches <= size:
        raise ValueError(
            f"model.update.num_minibatches: {upd.num_minibatches} must be between 1 and the "
            f"rollout batch size {size}"
        )
    ranks = module_ranks(module)
    stats = PPOStats()
    extra: dict[str, float] = {"policy/epochs_done": 0.0, "policy/early_stop": 0.0}
    first = True
    for opt in module.ppo_optimizers():
        opt.zero_grad(set_to_none=True)
    for epoch in range(upd.ppo_epochs):
        order = torch.randperm(size, device=rollout.query_ids.device)
        for chunk in torch.tensor_split(order, upd.num_minibatches):
            mb = rollout.select(chunk)
            n_tokens = _global_count(ranks, mb.response_mask.sum())
            if upd.ptx_coef > 0:  # first: the PPO backwards below also average its gradients
                with _unsynced_gradients(module):
                    _ptx_backward(module, stats)
            deviation = 0.0
            for part in micro_batches(len(mb), upd.micro_batch_size):
                micro = mb.select(torch.arange(len(mb), device=chunk.device)[part])
                deviation += _micro_losses(module, micro, n_tokens, stats)
            if first:
                mean_dev = _global_count(ranks, torch.tensor(deviation)) / n_tokens
                _check_ratio(stats, mean_dev, upd.ratio_check_tol)
                first = False
            _step_optimizers(module)
            closed = stats.end_minibatch(ranks)  # global: the early stop agrees on every rank
            if upd.target_kl is not None and closed["policy/approxkl"] > upd.target_kl:
                extra["policy/early_stop"] = 1.0
                break
        extra["policy/epochs_done"] = float(epoch + 1)
        if extra["policy/early_stop"]:
            break
    result = stats.means()
    result["policy/ratio_at_start"] = stats.first.get("policy/ratio_mean", 1.0)
    result.update(extra)
    return result


def _unsynced_gradients(module):
    """DDP's `no_sync()` (a null context otherwise) for the PPO-ptx backward, which leaves the
    critic / value head without gradients — a synchronised DDP backward would fail on those
    unused parameters. Its gradients stay local and the next synchronised backward (the PPO
    micro-batches) averages them with everything accumulated."""
    from torch.nn.parallel import DistributedDataParallel

    trainer = getattr(module, "_trainer", None)
    wrapped = getattr(trainer.strategy, "model", None) if trainer is not None else None
    if isinstance(wrapped, DistributedDataParallel):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def _global_count(ranks: CrossRank, local: torch.Tensor) -> float:
    """A per-rank count (or sum) averaged over ranks: DDP averages gradients, so dividing each
    rank's token sum by this gives Σ over all ranks / total valid tokens (exact token-mean)."""
    return float(ranks.mean_over_ranks(local.double()))


def _check_ratio(stats: PPOStats, mean_abs_dev: float, tol: float | None) -> None:
    """Fail loudly when π/π_old ≠ 1 before the first optimizer step (`mean_abs_dev` and the
    ratio statistics are over every rank, so all ranks raise together)."""
    if tol is None or mean_abs_dev <= tol:
        return
    ratio = stats.current.get("policy/ratio_mean", float("nan"))
    raise RatioMismatchError(
        f"ppo/policy/ratio_at_start: mean |π/π_old − 1| = {mean_abs_dev:.3g} > "
        f"model.update.ratio_check_tol={tol} (ratio mean {ratio:.4f}) before any update — the "
        "training forward does not reproduce the rollout log-probs; check dropout, temperature, "
        "dtype/autocast and padding/position ids"
    )
