"""`EpochShuffleSampler` shards for data parallelism: disjoint, complete, global-batch exact."""

from __future__ import annotations

from collections import Counter

import pytest
from torch.utils.data import DistributedSampler

from rlhf_lightning.data.sampling import EpochShuffleSampler, resume_skip


def _shards(n: int, world: int, epoch: int = 0) -> list[list[int]]:
    samplers = [EpochShuffleSampler(n, seed=5, num_replicas=world, rank=r) for r in range(world)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


@pytest.mark.parametrize("n", [0, 1, 6, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_the_epoch_once_padded_to_equal_length(n, world):
    shards = _shards(n, world)
    share = -(-n // world)  # ceil
    assert [len(s) for s in shards] == [share] * world  # every rank runs the same steps
    assert all(len(EpochShuffleSampler(n, seed=5, num_replicas=world, rank=r)) == share
               for r in range(world))  # fmt: skip
    seen = Counter(i for shard in shards for i in shard)
    assert set(seen) == set(range(n))
    if n % world == 0:
        assert max(seen.values(), default=1) == 1  # divisible: disjoint shards


def test_per_rank_batches_together_are_the_single_process_batches():
    """Batch k (size b) of every rank = batch k (size W·b) of one process, as sets."""
    world, batch = 2, 3
    whole = _shards(24, 1, epoch=1)[0]
    shards = _shards(24, world, epoch=1)
    for k in range(24 // (world * batch)):
        together = sorted(i for s in shards for i in s[k * batch : (k + 1) * batch])
        assert together == sorted(whole[k * world * batch : (k + 1) * world * batch])
    assert _shards(24, world, epoch=1) == shards and _shards(24, world, epoch=2) != shards


def test_resume_skip_is_within_the_rank_share():
    full = _shards(20, 2)[1]
    sampler = EpochShuffleSampler(20, seed=5, num_replicas=2, rank=1)
    sampler.skip_next(4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # one-shot


def test_lightning_keeps_it_and_bad_rank_is_reported():
    # Lightning wraps any sampler that is not a DistributedSampler in a second, re-shuffling shard
    assert isinstance(EpochShuffleSampler(4, seed=0), DistributedSampler)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, num_replicas=2\)"):
        EpochShuffleSampler(4, seed=0, num_replicas=2, rank=2)


@pytest.mark.parametrize(
    "before, after", [((2, 4), (1, 4)), ((1, 4), (2, 4)), ((2, 4), (2, 2)), ((2, 4), (2, 4))]
)
def test_resume_on_another_world_size_continues_the_epoch_order(before, after):
    """Samples seen before a checkpoint (world W, per-rank batch b) + after a resume on (W', b')
    = the epoch order exactly once, whatever W' and b'."""
    (world, batch), (world2, batch2) = before, after
    n, steps = 48, 3
    seen = [i for s in _shards(n, world, epoch=2) for i in s[: steps * batch]]
    state = {"batches_consumed_in_epoch": steps, "batch_size": batch, "num_replicas": world}
    skip = resume_skip(state, batch2, world2)
    rest = [i for s in _shards(n, world2, epoch=2) for i in s[skip:]]
    assert sorted(seen + rest) == list(range(n))


def test_resume_skip_reads_old_checkpoints_and_warns_when_not_divisible():
    assert resume_skip({"batches_consumed_in_epoch": 3}, batch_size=4, num_replicas=2) == 12
    with pytest.warns(UserWarning, match="not divisible"):
        skip = resume_skip(
            {"batches_consumed_in_epoch": 3, "batch_size": 1, "num_replicas": 1}, 1, 2
        )
    assert skip == 1
