"""Resumable, RNG-isolated sample order for the training dataloaders.

A training run resumed from a mid-epoch checkpoint must see exactly the batches it would
have seen without the interruption. Two things make that hold:

- the order of epoch `e` is a permutation drawn from `torch.Generator().manual_seed(seed + e)`,
  never from the global RNG, so it does not depend on how much randomness the model used
  (PPO samples tokens from the global RNG) nor on how many epochs a process has iterated;
- the number of batches already *consumed* in the current epoch is saved with the
  checkpoint, and the first iteration after a restore skips exactly those samples.

"Consumed" is read from Lightning's own progress counter (`batch_progress.current.processed`)
rather than counted at fetch time, because Lightning prefetches one batch ahead: a count of
fetched batches would be one too many at every checkpoint.

Lightning calls `set_epoch` on a dataloader's sampler at every epoch start, and saves and
restores the state of any train dataloader that has `state_dict` / `load_state_dict`.

Under data parallelism (DDP) each rank iterates its own shard of the same epoch order (see
`EpochShuffleSampler`); every rank consumes the same number of batches, so the consumed count
saved by rank 0 resumes every rank at the right place of its shard.

`EpochBatches` draws batches outside a training loop (PPO-ptx demonstrations) in the same
per-epoch order, with its own resumable position (`{"epoch", "consumed"}`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    """Indices 0..n-1, shuffled per epoch from `seed + epoch`, this rank's shard of them, with a
    one-shot resume skip.

    Data parallelism: the epoch's order is padded (by repeating its head, as torch's
    `DistributedSampler` does) to a multiple of `num_replicas`, and rank r takes every
    `num_replicas`-th index from position r. Batch k of every rank together is then exactly batch
    k of one process with a `num_replicas` times larger batch. It subclasses `DistributedSampler`
    only so that Lightning keeps it instead of wrapping it in a second, re-shuffling shard
    (`use_distributed_sampler`); the defaults (one replica) serve the whole dataset.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"EpochShuffleSampler: rank {rank} is not in [0, num_replicas={num_replicas})"
            )
        super().__init__(
            range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed
        )  # sets num_samples = ceil(n / num_replicas) (this rank's share) and total_size
        self.dataset_size = num_samples
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of `epoch` (called by Lightning at each epoch start)."""
        self.epoch = epoch

    def skip_next(self, num_samples: int) -> None:
        """Make the next iteration start `num_samples` into this rank's share (resume)."""
        self._skip = max(0, int(num_samples))

    def order(self) -> torch.Tensor:
        """The full index order of the current epoch (every rank's, before sharding)."""
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def shard(self) -> torch.Tensor:
        """This rank's indices of the current epoch, Long[num_samples]."""
        order = self.order()  # [n]
        if self.total_size > len(order) and len(order) > 0:
            repeats = -(-self.total_size // len(order))  # ceil
            order = order.repeat(repeats)[: self.total_size]  # [total_size]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self):
        start, self._skip = self._skip, 0
        yield from self.shard()[start:].tolist()

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning saves and restores with the fit loop (`state_dict` protocol).

    `consumed` is a zero-argument callable giving the batches of the current epoch that the
    training loop has finished processing; the datamodule binds it to the attached Trainer.
    """

    def __init__(self, *args, consumed: Callable[[], int] = lambda: 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.consumed = consumed

    def state_dict(self) -> dict[str, Any]:
        """Data position: batches of the current epoch already consumed, the per-rank batch size
        and the number of ranks (together: samples of the epoch order consumed), the seed."""
        return {
            "batches_consumed_in_epoch": int(self.consumed()),
            "seed": self.sampler.seed,
            "batch_size": self.batch_size,
            "num_replicas": self.sampler.num_replicas,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Start the next iteration after the samples the checkpointed run had consumed."""
        if state_dict.get("seed", self.sampler.seed) != self.sampler.seed:
            warnings.warn(
                "resuming with a different data seed: the sample order will differ", stacklevel=2
            )
        self.sampler.skip_next(resume_skip(state_dict, self.batch_size, self.sampler.num_replicas))


def resume_skip(state: dict[str, Any], batch_size: int, num_replicas: int) -> int:
    """Samples of this rank's shard to skip on resume, for any (batch size, world size) now.

    Rank r's shard is order[r::R], so the first k·R samples of the epoch order are the first k
    of every shard: a run that consumed `batches · batch_size · replicas` samples (its values in
    `state`; older checkpoints lack the last two and mean the current ones) resumes `consumed //
    num_replicas` into each shard — exact when that divides, else rounded down with a warning.
    """
    saved_batch = int(state.get("batch_size", batch_size))
    saved_replicas = int(state.get("num_replicas", num_replicas))
    consumed = int(state.get("batches_consumed_in_epoch", 0)) * saved_batch * saved_replicas
    if consumed % num_replicas:
        warnings.warn(
            f"resuming {consumed} samples into the epoch on {num_replicas} ranks: not divisible, "
            f"{consumed % num_replicas} sample(s) will be seen again",
            stacklevel=2,
        )
    return consumed // num_replicas


class EpochBatches:
    """Endless full batches of a dataset in `EpochShuffleSampler`'s seeded order, resumable.

    Epoch `e` visits the sampler's permutation for `seed + e` in consecutive batches of
    `batch_size` and drops the last partial batch (a dataset smaller than one batch gives one
    short batch per epoch). `state_dict()` = `{"epoch", "consumed"}` (batches of that epoch
    already drawn); a new `EpochBatches` with that `position` continues exactly there. Every
    data-parallel rank drawing from the same position gets the same batch.
    """

    def __init__(
        self,
        dataset: Sequence,
        collate_fn: Callable[[list], Any],
        batch_size: int,
        seed: int,
        position: dict[str, int] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"EpochBatches: batch_size must be >= 1, got {batch_size}")
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn, batch_size
        self.sampler = EpochShuffleSampler(len(dataset), seed=seed)
        self.load_state_dict(position or {"epoch": 0, "consumed": 0})
        self._order: tuple[int, list[int]] | None = None  # (epoch, its index order)

    def batch_starts(self) -> list[int]:
        """Offsets of the batches of one epoch in its order."""
        return list(range(0, len(self.dataset) - self.batch_size + 1, self.batch_size)) or [0]

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            self.sampler.set_epoch(self.epoch)
            self._order = (self.epoch, self.sampler.order().tolist())
        return self._order[1]

    def __iter__(self) -> EpochBatches:
        return self

    def __next__(self) -> Any:
        """The next batch (collated); moves to the next epoch after the last full batch."""
        starts = self.batch_starts()
        if self.consumed >= len(starts):
            self.epoch, self.consumed = self.epoch + 1, 0
        start = starts[self.consumed]
        self.consumed += 1
        indices = self._epoch_order()[start : start + self.batch_size]
        return self.collate_fn([self.dataset[i] for i in indices])

    def state_dict(self) -> dict[str, int]:
        """The position: `{"epoch": e, "consumed": batches of epoch e already drawn}`."""
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict()` position."""
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
