"""The cross-rank PPO statistics as pure functions, without processes: W threads act as ranks.

`ThreadRanks` gives each thread a `CrossRank` whose sum / max / gather meet at a barrier, so a
function called on each shard in its own thread sees exactly what it would under DDP. Each
statistic computed on shards must equal the single-process value on the whole batch, and (to
show the check bites) differ from the per-shard value without the reduction. Data are float64,
so the only difference is summation order (tolerance 1e-12).
"""

from __future__ import annotations

import threading

import pytest
import torch

from rlhf_lightning.ppo.advantages import Advantages, explained_variance, masked_mean, whiten
from rlhf_lightning.ppo.distributed import LOCAL, CrossRank
from rlhf_lightning.ppo.logprobs import TokenStats
from rlhf_lightning.ppo.losses import PPOStats
from rlhf_lightning.ppo.monitor import RewardHackingMonitor
from rlhf_lightning.ppo.reporting import iteration_stats
from rlhf_lightning.ppo.rollout import Rollout
from rlhf_lightning.ppo.running_moments import RunningMoments
from rlhf_lightning.ppo.scoring import Scores
from rlhf_lightning.ppo.state import get_rng_state, rank_rng_state
from rlhf_lightning.ppo.stats import StepTimings, UpdateStats

TOL = 1e-12
LENGTHS = [[5, 1, 3], [4, 2, 6, 6, 1]]  # valid tokens per row, shard 0 and shard 1


class ThreadRanks:
    """`world` threads standing in for data-parallel ranks."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list = [None] * world

    def _exchange(self, rank: int, value) -> list:
        self.slots[rank] = value
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before all have read
        return everyone

    def ranks(self, rank: int) -> CrossRank:
        def reduce_fn(tensor: torch.Tensor, op: str) -> torch.Tensor:
            stacked = torch.stack(self._exchange(rank, tensor.clone()))  # [W, ...]
            return stacked.sum(0) if op == "sum" else stacked.amax(0)

        def gather_fn(items: list) -> list:
            return [item for part in self._exchange(rank, items) for item in part]

        return CrossRank(self.world, reduce_fn, gather_fn)

    def run(self, fn, shards: list) -> list:
        """`fn(ranks, shard)` on every shard in its own thread; their results in rank order."""
        results, errors = [None] * self.world, []

        def target(rank):
            try:
                results[rank] = fn(self.ranks(rank), shards[rank])
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()  # [B, R]


def _shards(seed: int = 0) -> tuple[list[tuple], tuple]:
    """Two shards (x Float64[b, R_r], mask) of different widths and the whole batch (padded)."""
    gen = torch.Generator().manual_seed(seed)
    shards = []
    for lengths in LENGTHS:
        width = max(lengths)
        x = torch.randn(len(lengths), width, generator=gen, dtype=torch.float64) * 3 + 1
        shards.append((x, _mask(lengths, width)))
    width = max(max(lengths) for lengths in LENGTHS)
    whole_x = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x, _ in shards])
    return shards, (whole_x, _mask(sum(LENGTHS, []), width))


def _valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The valid values of a padded batch, row by row (a 1-D tensor)."""
    return x[mask.bool()]


def test_whitening_over_shards_equals_whole_batch():
    shards, (whole, whole_mask) = _shards()
    expected = _valid(whiten(whole, whole_mask), whole_mask)
    out = ThreadRanks(2).run(lambda ranks, s: whiten(*s, ranks=ranks), shards)
    got = torch.cat([_valid(o, m) for o, (_, m) in zip(out, shards)])
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    assert float(got.mean()) == pytest.approx(0.0, abs=TOL)
    assert float(got.var()) == pytest.approx(1.0, abs=1e-8)  # eps = 1e-8 in the variance
    local = torch.cat([_valid(whiten(*s), s[1]) for s in shards])  # what a per-rank whiten gives
    assert (local - expected).abs().max() > 1e-2


def test_masked_mean_and_explained_variance_over_shards():
    shards, (whole, whole_mask) = _shards()
    values_shards, (values, _) = _shards(seed=1)

    def stats(ranks, shard):
        (x, mask), v = shard
        return float(masked_mean(x, mask, ranks=ranks)), explained_variance(v, x, mask, ranks)

    pairs = [(s, v[0]) for s, v in zip(shards, values_shards)]
    results = ThreadRanks(2).run(stats, pairs)
    mean = float(masked_mean(whole, whole_mask))
    ev = explained_variance(values, whole, whole_mask)
    for got_mean, got_ev in results:
        assert got_mean == pytest.approx(mean, abs=TOL)
        assert got_ev == pytest.approx(ev, abs=TOL)
    assert float(masked_mean(*shards[0])) != pytest.approx(mean, abs=1e-2)


def test_running_reward_moments_merge_every_rank():
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, generator=gen, dtype=torch.float64) * 2 - 1 for n in (3, 5, 4, 4)]

    def two_updates(ranks, shard):
        moments = RunningMoments()
        for values in shard:
            moments = moments.merged(values, ranks)
        return moments.state_dict()

    # rank 0 sees batches 0 and 2, rank 1 batches 1 and 3 (two iterations of 7 and 8 rewards)
    states = ThreadRanks(2).run(two_updates, [batches[0::2], batches[1::2]])
    everything = torch.cat(batches)
    assert states[0] == states[1]
    assert states[0]["count"] == 16
    assert states[0]["mean"] == pytest.approx(float(everything.mean()), abs=TOL)
    assert states[0]["m2"] == pytest.approx(float(everything.var() * 15), abs=1e-10)
    alone = two_updates(LOCAL, batches[0::2])
    assert alone["count"] == 7 and alone["mean"] != pytest.approx(states[0]["mean"], abs=1e-3)


class _Part:
    """The outputs of steps 1–4 for one shard (random float64), as `iteration_stats` takes them."""

    def __init__(self, rollout, scores, tokens, adv):
        self.rollout, self.scores, self.tokens, self.adv = rollout, scores, tokens, adv

    def args(self):
        return self.rollout, self.scores, self.tokens, self.adv


def _part(lengths: list[int], seed: int) -> _Part:
    """A random float64 shard with rows of `lengths` valid tokens."""
    gen = torch.Generator().manual_seed(seed)
    b, width = len(lengths), max(lengths)
    mask = _mask(lengths, width)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    words = ["good", "bad", "plot", "the"]
    responses = [
        " ".join(words[(seed + i + k) % 4] for k in range(n)) for i, n in enumerate(lengths)
    ]
    ones = torch.ones(b, 2, dtype=torch.long)
    rollout = Rollout(ones, ones, torch.ones(b, width, dtype=torch.long), mask, ["p"] * b)
    zeros = torch.zeros(b, width, dtype=torch.float64)
    tokens = TokenStats(zeros, zeros, rand(b, width).abs() * mask, rand(b, width).abs() * mask,
                        rand(b, width) * mask)  # fmt: skip
    shaped, raw = rand(b), rand(b)
    ends = torch.full((b,), seed % 2 == 1)  # EOS share 0 / 1 per shard (exact in float32)
    scores = Scores(responses, raw, shaped, ends, rand(b).tolist(), RunningMoments())
    adv = Advantages(zeros, rand(b, width) * mask, rand(b, width) * mask, 0.1)
    return _Part(rollout, scores, tokens, adv)


def _concat(parts: list[_Part]) -> _Part:
    """One shard of all rows, [B, R] fields right-padded with 0 to the widest part."""

    def cat(tensors):
        if tensors[0].dim() == 2:
            width = max(t.shape[1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors]
        return torch.cat(tensors)

    def join(objs, names):
        return [cat([getattr(o, n) for o in objs]) for n in names]

    r = [p.rollout for p in parts]
    rollout = Rollout(*join(r, ("query_ids", "query_mask", "response_ids", "response_mask")),
                      sum((x.prompts for x in r), []))  # fmt: skip
    sc = [p.scores for p in parts]
    scores = Scores(sum((x.responses for x in sc), []), *join(sc, ("raw", "shaped", "ends_with_eos")),
                    sum((x.gold for x in sc), []), RunningMoments())  # fmt: skip
    tokens = TokenStats(*join([p.tokens for p in parts], ("logprobs", "ref_logprobs", "entropy",
                                                           "kl", "values")))  # fmt: skip
    adv = Advantages(*join([p.adv for p in parts], ("rewards", "advantages", "returns")), 0.1)
    return _Part(rollout, scores, tokens, adv)


UPDATE = UpdateStats(*([0.5] * 4), 0.25, *([0.5] * 5), epochs_done=1, early_stop=False)
TIMINGS = StepTimings(1.0, 1.0, 1.0, 1.0)


def test_iteration_metrics_kl_and_monitor_are_global():
    """Every metric (incl. the sequence KL the adaptive controller reads, response-length max, EOS
    fraction, gold) and the monitor's signals over 2 shards equal those of the whole batch."""
    parts = [_part(lengths, seed) for seed, lengths in enumerate(LENGTHS)]
    whole = _concat(parts)

    def metrics_and_monitor(ranks, part):
        metrics = iteration_stats(*part.args(), UPDATE, TIMINGS, 0.1, ranks).to_tags()
        monitor = RewardHackingMonitor(window=3)
        report = monitor.update(
            metrics["ppo/objective/reward_raw"], metrics["ppo/objective/gold"],
            ranks.gather(part.scores.responses),
        )  # fmt: skip
        return metrics, report.signals

    results = ThreadRanks(2).run(metrics_and_monitor, parts)
    expected = iteration_stats(*whole.args(), UPDATE, TIMINGS, 0.1).to_tags()
    signals = (
        RewardHackingMonitor(window=3)
        .update(
            expected["ppo/objective/reward_raw"],
            expected["ppo/objective/gold"],
            whole.scores.responses,
        )
        .signals
    )
    keys = [k for k in expected if not k.startswith("ppo/perf/")]
    assert "ppo/objective/kl" in keys and "ppo/response/length_max" in keys
    assert "ppo/response/eos_fraction" in keys
    for metrics, got_signals in results:
        for key in keys:
            assert metrics[key] == pytest.approx(expected[key], abs=TOL, nan_ok=True), key
        assert got_signals == pytest.approx(signals, abs=TOL)
    local = iteration_stats(*parts[1].args(), UPDATE, TIMINGS, 0.1).to_tags()
    assert local["ppo/objective/kl"] != pytest.approx(expected["ppo/objective/kl"], abs=1e-3)


def test_ppo_stats_average_the_ranks_minibatch_values():
    """Each rank's minibatch totals are Σ_rank / (N / W); their mean over ranks is Σ / N."""

    def close(ranks, values):
        stats = PPOStats()
        stats.add({"policy/approxkl": values[0], "loss/total": values[1]})
        return stats.end_minibatch(ranks)

    results = ThreadRanks(2).run(close, [(0.5, 1.0), (1.5, -3.0)])
    assert results[0] == results[1] == {"loss/total": -1.0, "policy/approxkl": 1.0}


def test_rng_state_of_each_rank_from_a_checkpoint():
    states = [get_rng_state(), get_rng_state()]
    states[1]["python"] = (3, (1,), None)  # any distinct marker
    ppo_state = {"rng": states[0], "rng_per_rank": states}
    assert rank_rng_state(ppo_state, 1, 2) is states[1]
    assert rank_rng_state({"rng": states[0]}, 0, 1) is states[0]  # older checkpoints
    with pytest.warns(UserWarning, match="RNG states of 2 rank"):
        resumed = [rank_rng_state(ppo_state, rank, 4) for rank in range(4)]
    assert torch.equal(resumed[0]["torch"], states[0]["torch"])  # rank 0 continues exactly
    torch_states = [r["torch"] for r in resumed]
    assert all(not torch.equal(a, b) for i, a in enumerate(torch_states) for b in torch_states[:i])
    with pytest.warns(UserWarning):
        again = rank_rng_state(ppo_state, 3, 4)
    assert torch.equal(again["torch"], resumed[3]["torch"])  # derived deterministically


def test_gather_of_tensors_survives_all_gather_object():
    """`CrossRank.of` gathers RNG snapshots (tensors inside) through torch.distributed: a real
    one-process gloo group checks the byte encoding round trip."""
    import torch.distributed as dist

    from rlhf_lightning.ppo.distributed import _all_gather_objects

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        state = get_rng_state()
        (back,) = _all_gather_objects([state])
    finally:
        dist.destroy_process_group()
    assert torch.equal(back["torch"], state["torch"]) and back["python"] == state["python"]
    assert back["numpy"][1].dtype == state["numpy"][1].dtype
    assert torch.equal(back["numpy"][1], state["numpy"][1])
