"""`LightningOps`: the PPO update's `UpdateOps` on a LightningModule under manual optimisation.

Backward is `manual_backward` (AMP loss scaling, DDP gradient sync); steps go through the
Lightning-wrapped optimizers of `module.optimizers()`, so `on_before_optimizer_step` (gradient
clipping after 16-mixed unscaling) runs and `global_step` counts; `no_sync` is DDP's `no_sync()`
(a null context otherwise); `ranks` are the Trainer's cross-rank reductions.
"""

from __future__ import annotations

import contextlib

import torch
from lightning.pytorch import LightningModule

from rlhf_lightning.ppo.distributed import CrossRank, module_ranks

__all__ = ["LightningOps"]


class LightningOps:
    """`rlhf_lightning.ppo.update.UpdateOps` for `module` (its Trainer must be attached)."""

    def __init__(self, module: LightningModule) -> None:
        self._module = module
        self.ranks: CrossRank = module_ranks(module)

    def _optimizers(self) -> list:
        opts = self._module.optimizers()
        return list(opts) if isinstance(opts, list | tuple) else [opts]

    def _schedulers(self, n: int) -> list:
        scheds = self._module.lr_schedulers()
        if scheds is None:
            return [None] * n
        return list(scheds) if isinstance(scheds, list | tuple) else [scheds]

    def zero_grad(self) -> None:
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self._module.manual_backward(loss)

    def step(self) -> None:
        """Step every optimizer (gradients are clipped in the module's `on_before_optimizer_step`,
        i.e. after a 16-mixed loss scaler has unscaled them) and its scheduler; zero gradients."""
        opts = self._optimizers()
        for opt, sched in zip(opts, self._schedulers(len(opts))):
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()

    def no_sync(self) -> contextlib.AbstractContextManager:
        """DDP's `no_sync()` (a null context otherwise), for the PPO-ptx backward, which leaves
        the critic / value head without gradients — a synchronised DDP backward would fail on
        those unused parameters. Its gradients stay local and the next synchronised backward (the
        PPO micro-batches) averages them with everything accumulated."""
        from torch.nn.parallel import DistributedDataParallel

        trainer = getattr(self._module, "_trainer", None)
        wrapped = getattr(trainer.strategy, "model", None) if trainer is not None else None
        if isinstance(wrapped, DistributedDataParallel):
            return wrapped.no_sync()
        return contextlib.nullcontext()
