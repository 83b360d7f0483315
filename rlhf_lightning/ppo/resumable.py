"""A prompt loader whose order and position survive a checkpoint resume.

A plain `DataLoader` restarts its epoch from the first batch when training resumes mid-epoch (and
its shuffle depends on how often it was iterated before). `ResumableLoader` wraps the
datamodule's loader: the order of epoch e is a permutation drawn from `seed + e`, and it has
`state_dict()` / `load_state_dict()` (Lightning's "stateful dataloader" protocol). The position
comes from `position_fn` — the batches the module has actually trained on, not the ones Lightning
prefetched. Lightning restores loader states only when it first builds the train loader after the
checkpoint is loaded, but it builds it earlier whenever `estimated_stepping_batches` is used in
`configure_optimizers`; so the module also hands the saved position over through `pending_fn`,
read when the iteration starts. Iteration runs in
the main process (the wrapped loader's dataset and collate function are used directly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader

__all__ = ["ResumableLoader"]


class ResumableLoader:
    """Deterministic, skippable iteration over `loader.dataset` with `loader.collate_fn`.

    Args:
        loader: the DataLoader to mirror (dataset, batch size, collate function, drop_last).
        seed: base seed of the per-epoch permutation.
        epoch_fn: returns the current epoch (e.g. `lambda: trainer.current_epoch`).
        position_fn: returns (epoch, batches trained on in that epoch) for `state_dict()`.
        pending_fn: returns (and forgets) a position restored from a checkpoint, or None; read
            when an iteration starts.
        shuffle: permute the dataset each epoch (False keeps the dataset order).
    """

    def __init__(
        self,
        loader: DataLoader,
        seed: int,
        epoch_fn: Callable[[], int],
        position_fn: Callable[[], tuple[int, int]],
        pending_fn: Callable[[], tuple[int, int] | None] = lambda: None,
        shuffle: bool = True,
    ) -> None:
        self.loader = loader
        self.dataset = loader.dataset
        self.batch_size = loader.batch_size
        self.collate_fn = loader.collate_fn
        self.drop_last = loader.drop_last
        self.seed = seed
        self.epoch_fn = epoch_fn
        self.position_fn = position_fn
        self.pending_fn = pending_fn
        self.shuffle = shuffle
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else (n + b - 1) // b

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Skip the first `batches_done` batches when epoch `epoch` is iterated next."""
        self._resume = (epoch, batches_done)

    def state_dict(self) -> dict[str, int]:
        """Position for the checkpoint: the epoch and the batches trained on in it."""
        epoch, done = self.position_fn()
        return {"epoch": int(epoch), "batches_done": int(done), "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from `state_dict()`: the next iteration of that epoch skips the done batches."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"data.seed: the checkpoint's prompt order used seed {state['seed']}, not {self.seed}"
            )
        self.resume_at(state["epoch"], state["batches_done"])

    def order(self, epoch: int) -> list[int]:
        """Dataset indices of epoch `epoch`."""
        if not self.shuffle:
            return list(range(len(self.dataset)))
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=gen).tolist()

    def __iter__(self) -> Iterator:
        epoch = int(self.epoch_fn())
        skip = 0
        resume = self.pending_fn() or self._resume
        self._resume = None
        if resume is not None:
            # the trainer may not have restored its epoch counter yet when Lightning first
            # iterates (it does so early to count batches), so the saved epoch wins
            epoch, skip = resume
        order = self.order(epoch)
        for b in range(skip, len(self)):
            indices = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.collate_fn([self.dataset[i] for i in indices])
