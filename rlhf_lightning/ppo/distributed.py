"""Cross-rank reductions for the PPO statistics that must be global under data parallelism.

With `strategy="ddp"` every rank holds its own shard of the prompt batch. DDP averages gradients,
but everything PPO computes from the rollout itself would silently become per-rank: advantage
whitening, the KL the adaptive controller measures, the running reward moments, the monitor's
signals and the logged metrics. Each of those is a pure function that takes a `CrossRank` and
does its reductions through it: `CrossRank.sum` (and `max`, `mean_over_ranks`, `gather`) is the
identity in one process (`LOCAL`) and an all-reduce over the data-parallel group under a
multi-rank Trainer (`CrossRank.of(trainer)`), so a run's numbers do not depend on the world size
beyond the sampling itself.

Means and variances are combined exactly (sums and counts first, then the sum of squared
deviations from the global mean), not as means of per-rank means.

References: Chan, Golub & LeVeque 1979, "Updating formulae and a pairwise algorithm for computing
sample variances" (combining moments); Huang et al. 2024, "The N+ Implementation Details of RLHF
with PPO" (whitening over all valid tokens of the batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["CrossRank", "LOCAL", "module_ranks"]


@dataclass(frozen=True)
class CrossRank:
    """Reductions over the data-parallel ranks; every method is the identity when world_size is 1.

    Every rank must call the same methods in the same order (they are collectives).
    """

    world_size: int = 1
    """Number of data-parallel ranks."""
    reduce_fn: Callable[[torch.Tensor, str], torch.Tensor] | None = None
    """`(tensor, op) -> tensor` all-reduce over the ranks, op "sum" or "max", the same result on
    every rank; it may work in place on the copy `of()` makes. None = identity."""
    gather_fn: Callable[[list], list] | None = None
    """`(list) -> list`: every rank's picklable list concatenated in rank order; None = identity."""

    @classmethod
    def of(cls, trainer) -> CrossRank:
        """Reductions of a Lightning Trainer's strategy (`LOCAL` without one or with one rank)."""
        if trainer is None or trainer.world_size == 1:
            return LOCAL
        strategy = trainer.strategy

        def reduce_fn(tensor: torch.Tensor, op: str) -> torch.Tensor:
            # Lightning's reduce works in place and needs the collective's device (CUDA for NCCL)
            on_device = tensor.detach().to(strategy.root_device, copy=True)
            return strategy.reduce(on_device, reduce_op=op).to(tensor.device)

        return cls(trainer.world_size, reduce_fn, _all_gather_objects)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of `tensor` over the ranks (same shape on every rank)."""
        if self.world_size == 1 or self.reduce_fn is None:
            return tensor
        return self.reduce_fn(tensor, "sum")

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of `tensor` over the ranks."""
        if self.world_size == 1 or self.reduce_fn is None:
            return tensor
        return self.reduce_fn(tensor, "max")

    def mean_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise mean over the ranks (for values that already weigh every rank equally)."""
        return self.sum(tensor) / self.world_size

    def gather(self, items: list) -> list:
        """Every rank's `items` concatenated in rank order (the list itself in one process)."""
        if self.world_size == 1 or self.gather_fn is None:
            return list(items)
        return self.gather_fn(list(items))


LOCAL = CrossRank()
"""The single-process `CrossRank`: every reduction is the identity."""


def _all_gather_objects(items: list) -> list:
    """`torch.distributed.all_gather_object` of a list, flattened in rank order. Tensors inside
    travel as raw bytes (torch 2.13 fails to unpickle tensors sent by all_gather_object)."""
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, _encode(items))
    return [_decode(item) for part in parts for item in part]


@dataclass(frozen=True)
class _TensorBytes:
    """A tensor as plain bytes + dtype + shape (picklable without torch's storage reducer)."""

    data: bytes
    """The tensor's memory, contiguous, as bytes."""
    dtype: str
    """`str(tensor.dtype)` without the `torch.` prefix."""
    shape: tuple[int, ...]
    """The tensor's shape."""


def _encode(obj):
    """`obj` with every tensor (in dicts, lists, tuples) replaced by `_TensorBytes`."""
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        return _TensorBytes(
            flat.numpy().tobytes(), str(obj.dtype).removeprefix("torch."), tuple(obj.shape)
        )
    if isinstance(obj, dict):
        return {key: _encode(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_encode(value) for value in obj)
    return obj


def _decode(obj):
    """Inverse of `_encode` (tensors come back on the CPU)."""
    if isinstance(obj, _TensorBytes):
        dtype = getattr(torch, obj.dtype)
        if not obj.data:
            return torch.empty(obj.shape, dtype=dtype)
        raw = torch.frombuffer(bytearray(obj.data), dtype=torch.uint8)
        return raw.view(dtype).reshape(obj.shape).clone()
    if isinstance(obj, dict):
        return {key: _decode(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_decode(value) for value in obj)
    return obj


def module_ranks(module) -> CrossRank:
    """The `CrossRank` of the Trainer a LightningModule is attached to (`LOCAL` when none)."""
    return CrossRank.of(getattr(module, "_trainer", None))
