"""Critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) against hand-worked values and
plain-Python loop references: as pure functions, and through `estimate_advantages` (step 4 as
the module calls it: KL-penalised rewards, kl.mode reward / loss, whitening null resolution).

Float64 checks differ from the references only by summation order and one sqrt / division per
value on O(1) numbers, so they use atol 1e-12. The float32 GRPO check follows the shared rule:
error vs. a float64 reference ≤ 2 × the error of torch's own float32 group mean / std on the
same input + atol 1e-6 (a few float32 ulps at |A| ≲ 3).
"""

from __future__ import annotations

import math
import statistics
import threading
from dataclasses import replace

import pytest
import torch

from rlhf_lightning.ppo.advantages import estimate_advantages, gae, kl_penalised_rewards, whiten
from rlhf_lightning.ppo.config import UpdateConfig, resolve_whitening
from rlhf_lightning.ppo.distributed import LOCAL, CrossRank
from rlhf_lightning.ppo.estimators import (
    broadcast_to_tokens,
    discounted_returns,
    group_layout,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf_lightning.ppo.logprobs import TokenStats
from rlhf_lightning.ppo.rollout import Rollout
from rlhf_lightning.ppo.running_moments import RunningMoments
from rlhf_lightning.ppo.scoring import Scores

TOL = 1e-12
F64 = torch.float64

# two groups of k = 3, interleaved: group 0 = [1, 2, 3], group 1 = [0, 0, 6]
HAND_REWARDS = torch.tensor([1.0, 0.0, 2.0, 0.0, 3.0, 6.0], dtype=F64)
HAND_GROUP = torch.tensor([0, 1, 0, 1, 0, 1])


def _close(got: torch.Tensor, expected, atol: float = TOL) -> None:
    expected = torch.as_tensor(expected, dtype=got.dtype)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()  # [B, R]


def _random_groups(num_groups: int, k: int, seed: int, dtype=F64):
    """Rewards Float[G·k] and shuffled (non-contiguous) prompt ids with arbitrary values."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(num_groups * k, generator=gen, dtype=dtype) * 2 + 0.5
    ids = torch.arange(num_groups).repeat_interleave(k) * 7 + 3  # ids 3, 10, 17, …
    return rewards, ids[torch.randperm(num_groups * k, generator=gen)]


def _by_group(rewards, group) -> dict[int, list[int]]:
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group.tolist()):
        members.setdefault(g, []).append(i)
    return members


def _grpo_loop(rewards, group, scale_by_std, eps):
    r, out = rewards.tolist(), [0.0] * len(rewards)
    for idx in _by_group(rewards, group).values():
        values = [r[i] for i in idx]
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0  # sample (unbiased) std
        for i in idx:
            out[i] = (
                (r[i] - mean) / (std + eps) if scale_by_std and len(values) > 1 else r[i] - mean
            )
    return out


def _rloo_loop(rewards, group):
    r, out = rewards.tolist(), [0.0] * len(rewards)
    for idx in _by_group(rewards, group).values():
        for i in idx:
            out[i] = r[i] - statistics.fmean([r[j] for j in idx if j != i])
    return out


def _returns_loop(row: list[float], gamma: float) -> list[float]:
    out, running = [0.0] * len(row), 0.0
    for t in reversed(range(len(row))):
        running = row[t] + gamma * running
        out[t] = running
    return out


# --- hand-worked values --------------------------------------------------------------------


def test_grpo_hand_worked():
    # group 0: mean 2, std 1 → [-1, 0, 1]; group 1: mean 2, var (4+4+16)/2 = 12, std 2√3
    s3 = math.sqrt(3.0)
    got = grpo_advantages(HAND_REWARDS, HAND_GROUP, eps=0.0)
    _close(got, [-1.0, -1 / s3, 0.0, -1 / s3, 1.0, 2 / s3])


def test_dr_grpo_hand_worked_is_exact():
    got = grpo_advantages(HAND_REWARDS, HAND_GROUP, scale_by_std=False)
    assert got.tolist() == [-1.0, -2.0, 0.0, -2.0, 1.0, 4.0]


def test_rloo_hand_worked_is_exact():
    # 1 − (2+3)/2, 2 − (1+3)/2, 3 − (1+2)/2;  0 − (0+6)/2, 0 − (0+6)/2, 6 − (0+0)/2
    got = rloo_advantages(HAND_REWARDS, HAND_GROUP)
    assert got.tolist() == [-1.5, -3.0, 0.0, -3.0, 1.5, 6.0]


def test_reinforce_pp_hand_worked():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 9.0, 9.0]], dtype=F64)  # 9 = padding
    mask = _mask([3, 1], 3)
    returns = discounted_returns(rewards, mask, gamma=0.5)
    assert returns.tolist() == [[0.25, 0.5, 1.0], [0.5, 0.0, 0.0]]
    valid = [0.25, 0.5, 1.0, 0.5]
    mean, std = statistics.fmean(valid), statistics.stdev(valid)
    got = reinforce_pp_advantages(rewards, mask, gamma=0.5, eps=0.0)
    _close(got, [[(v - mean) / std for v in valid[:3]], [(0.5 - mean) / std, 0.0, 0.0]])


# --- loop references on random inputs --------------------------------------------------------


@pytest.mark.parametrize("num_groups,k", [(5, 4), (3, 2), (1, 8)])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_matches_loop(num_groups, k, scale_by_std):
    rewards, group = _random_groups(num_groups, k, seed=k)
    got = grpo_advantages(rewards, group, scale_by_std=scale_by_std, eps=1e-6)
    _close(got, _grpo_loop(rewards, group, scale_by_std, 1e-6))


@pytest.mark.parametrize("num_groups,k", [(5, 4), (3, 2), (2, 7)])
def test_rloo_matches_loop(num_groups, k):
    rewards, group = _random_groups(num_groups, k, seed=10 + k)
    _close(rloo_advantages(rewards, group), _rloo_loop(rewards, group))


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_reinforce_pp_matches_loop(gamma):
    gen = torch.Generator().manual_seed(3)
    lengths, width = [5, 1, 7, 0, 3], 7
    rewards = torch.randn(len(lengths), width, generator=gen, dtype=F64)
    mask = _mask(lengths, width)
    rows = [_returns_loop(rewards[b, :n].tolist(), gamma) for b, n in enumerate(lengths)]
    valid = [v for row in rows for v in row]
    mean, var = statistics.fmean(valid), statistics.variance(valid)
    got = reinforce_pp_advantages(rewards, mask, gamma=gamma, eps=1e-8)
    for b, n in enumerate(lengths):
        _close(got[b, :n], [(v - mean) / math.sqrt(var + 1e-8) for v in rows[b]])
        assert (got[b, n:] == 0).all()  # padding and the empty response
    returns = discounted_returns(rewards, mask, gamma)
    for b, n in enumerate(lengths):
        _close(returns[b, :n], rows[b])


def test_grpo_float32_within_torch_own_error():
    k = 8
    rewards64, _ = _random_groups(64, k, seed=5)
    group = torch.arange(64).repeat_interleave(k)  # contiguous, so torch's view(-1, k) applies
    reference = torch.tensor(_grpo_loop(rewards64, group, True, 1e-6), dtype=F64)
    r32 = rewards64.float()
    view = r32.view(-1, k)  # TRL-style: mean / unbiased std of each row in float32
    torch_own = (r32 - view.mean(1).repeat_interleave(k)) / (
        view.std(1).repeat_interleave(k) + 1e-6
    )
    torch_err = (torch_own.double() - reference).abs().max().item()
    ours_err = (grpo_advantages(r32, group).double() - reference).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-6


# --- ties, k = 1, errors ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tie", [(torch.float32, 2.9), (F64, 0.1)])
def test_tied_groups_give_exact_zero(dtype, tie):
    # at this value a plain r − Σr/k is not 0 in this dtype (so the check bites)
    tied = torch.full((3,), tie, dtype=dtype)
    assert (tied - tied.sum() / 3 != 0).all()
    rewards = torch.tensor([tie, 5.0, tie, -1.0, tie, 3.0], dtype=dtype)
    group = torch.tensor([0, 1, 0, 1, 0, 1])
    for adv in (
        grpo_advantages(rewards, group),
        grpo_advantages(rewards, group, eps=0.0),  # 0 / 0 would be NaN
        grpo_advantages(rewards, group, scale_by_std=False),
        rloo_advantages(rewards, group),
    ):
        assert not adv.isnan().any()
        assert adv[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]
        assert (adv[[1, 3, 5]] != 0).all()  # the other group (mean 7/3) is untouched


def test_grpo_with_one_sample_per_prompt_is_zero():
    rewards = torch.tensor([3.0, -2.0, 0.7])
    group = torch.tensor([4, 0, 9])
    for scale in (True, False):
        adv = grpo_advantages(rewards, group, scale_by_std=scale, eps=0.0)
        assert adv.tolist() == [0.0, 0.0, 0.0]


def test_rloo_needs_two_samples_per_prompt():
    with pytest.raises(ValueError, match=r"generation\.samples_per_prompt >= 2"):
        rloo_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))


def test_unequal_group_sizes_are_rejected():
    with pytest.raises(ValueError, match=r"samples_per_prompt.*\[1, 2\]"):
        grpo_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


# --- layout and broadcasting -----------------------------------------------------------------


def test_non_contiguous_layout_equals_contiguous():
    rewards, group = _random_groups(4, 3, seed=7)
    order = torch.argsort(group, stable=True)  # the same samples with each group contiguous
    layout = group_layout(group)
    assert (layout.num_groups, layout.size) == (4, 3)
    for estimator in (grpo_advantages, rloo_advantages):
        _close(estimator(rewards, group)[order], estimator(rewards[order], group[order]))


def test_broadcast_to_tokens_short_and_empty_responses():
    seq = torch.tensor([1.5, -2.0, 0.25])
    mask = _mask([3, 1, 0], 4)
    got = broadcast_to_tokens(seq, mask)
    assert got.dtype == seq.dtype
    assert got.tolist() == [[1.5, 1.5, 1.5, 0.0], [-2.0, 0.0, 0.0, 0.0], [0.0] * 4]


# --- cross-rank normalisation ----------------------------------------------------------------


def _thread_ranks(world: int) -> list[CrossRank]:
    """`world` CrossRanks whose sum meets at a barrier (one thread per rank), as in
    tests/ddp/test_global_stats.py."""
    barrier, slots = threading.Barrier(world, timeout=30), [None] * world

    def make(rank: int) -> CrossRank:
        def reduce_fn(tensor: torch.Tensor, op: str) -> torch.Tensor:
            slots[rank] = tensor.clone()
            barrier.wait()
            stacked = torch.stack(list(slots))  # [W, ...]
            barrier.wait()  # nobody overwrites a slot before all have read
            return stacked.sum(0) if op == "sum" else stacked.amax(0)

        return CrossRank(world, reduce_fn)

    return [make(rank) for rank in range(world)]


def test_reinforce_pp_normalises_over_every_rank():
    gen = torch.Generator().manual_seed(11)
    lengths = [[5, 1, 3], [4, 2, 6, 6, 1]]  # shard 0 and shard 1, different widths
    shards = []
    for shard_lengths in lengths:
        width = max(shard_lengths)
        rewards = torch.randn(len(shard_lengths), width, generator=gen, dtype=F64) * 3 + 1
        shards.append((rewards, _mask(shard_lengths, width)))
    width = max(max(x) for x in lengths)
    whole = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r, _ in shards])
    whole_mask = _mask(sum(lengths, []), width)
    expected = reinforce_pp_advantages(whole, whole_mask, gamma=0.9)[whole_mask.bool()]

    ranks, results, errors = _thread_ranks(2), [None, None], []

    def run(rank: int) -> None:
        try:
            results[rank] = reinforce_pp_advantages(*shards[rank], gamma=0.9, ranks=ranks[rank])
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    got = torch.cat([out[m.bool()] for out, (_, m) in zip(results, shards)])
    _close(got, expected)
    local = torch.cat([reinforce_pp_advantages(*s, gamma=0.9)[s[1].bool()] for s in shards])
    assert (local - expected).abs().max() > 1e-2  # a per-rank normalisation would differ


# --- through estimate_advantages (step 4 as the module calls it) -------------------------------
# Two prompts × k = 2, response lengths [3, 1, 2, 3], β = 0.5 (dyadic numbers: exact sums).
# Sequence reward Σ_t r_t = shaped − β · Σ_t kl_t (9 = padding, ignored):
#   row 0: 1 − 0.5·1 = 0.5    row 1: 3 − 0.5·0.5 = 2.75    (group 0)
#   row 2: 2 − 0.5·0.5 = 1.75 row 3: 2 − 0.5·0.5 = 1.75    (group 1: tied after the KL → 0)

STEP4_LENGTHS = [3, 1, 2, 3]
STEP4_SHAPED = [1.0, 3.0, 2.0, 2.0]
STEP4_KL = [[0.25, 0.5, 0.25], [0.5, 9.0, 9.0], [0.25, 0.25, 9.0], [0.125, 0.25, 0.125]]
BETA = 0.5
SIGMA_0 = 1.125 * math.sqrt(2) + 1e-6  # group 0's unbiased std of (0.5, 2.75) + GRPO's eps


def _step4_inputs(values: torch.Tensor | None = None):
    """Scores, TokenStats and Rollout of the hand-worked batch (float64)."""
    mask = _mask(STEP4_LENGTHS, 3)
    kl = torch.tensor(STEP4_KL, dtype=F64)
    zeros = torch.zeros(4, 3, dtype=F64)
    shaped = torch.tensor(STEP4_SHAPED, dtype=F64)
    scores = Scores(["r"] * 4, shaped, shaped, torch.ones(4, dtype=torch.bool), None,
                    RunningMoments())  # fmt: skip
    stats = TokenStats(zeros, zeros, zeros, kl, values)
    query = torch.ones(4, 2, dtype=torch.long)
    rollout = Rollout(query, query, mask * 5, mask, ["p0", "p0", "p1", "p1"],
                      group=torch.tensor([0, 0, 1, 1]))  # fmt: skip
    return scores, stats, rollout


def _step4(advantage: str, kl_coef: float = BETA, **update):
    cfg = UpdateConfig(advantage=advantage, **update)
    return estimate_advantages(*_step4_inputs(), cfg, kl_coef, LOCAL)


def _per_row(values: list[float]) -> list[list[float]]:
    """Sequence advantages broadcast over the valid tokens of the hand-worked batch."""
    return [[v if t < n else 0.0 for t in range(3)] for v, n in zip(values, STEP4_LENGTHS)]


# discounted returns (γ = 1) of the token rewards, with kl.mode reward and with β = 0
RETURNS_REWARD = [[0.5, 0.625, 0.875], [2.75, 0, 0], [1.75, 1.875, 0], [1.75, 1.8125, 1.9375]]
RETURNS_NO_KL = [[1.0, 1.0, 1.0], [3.0, 0, 0], [2.0, 2.0, 0], [2.0, 2.0, 2.0]]


@pytest.mark.parametrize(
    "advantage,update,kl_coef,expected",
    [
        # kl.mode reward: group 0 centred ±1.125 (σ = 1.125·√2), group 1 tied → exactly 0
        ("grpo", {}, BETA, [-1.125 / SIGMA_0, 1.125 / SIGMA_0, 0, 0]),
        ("grpo", {"scale_by_std": False}, BETA, [-1.125, 1.125, 0, 0]),
        ("rloo", {}, BETA, [-2.25, 2.25, 0, 0]),
        # kl.mode loss: the module passes β = 0, the sequence reward is the shaped score alone
        ("grpo", {}, 0.0, [-1 / (math.sqrt(2) + 1e-6), 1 / (math.sqrt(2) + 1e-6), 0, 0]),
        ("grpo", {"scale_by_std": False}, 0.0, [-1.0, 1.0, 0, 0]),
        ("rloo", {}, 0.0, [-2.0, 2.0, 0, 0]),
    ],
)
def test_estimate_advantages_group_estimators_hand_worked(advantage, update, kl_coef, expected):
    adv = _step4(advantage, kl_coef, **update)
    assert adv.kl_coef == kl_coef
    seq = [s - kl_coef * sum(k[:n]) for s, k, n in zip(STEP4_SHAPED, STEP4_KL, STEP4_LENGTHS)]
    _close(adv.rewards.sum(-1), seq)  # shaped − β · Σ kl over valid tokens
    _close(adv.advantages, _per_row(expected))  # not whitened (null → off for critic-free)
    _close(adv.returns, RETURNS_REWARD if kl_coef else RETURNS_NO_KL)


@pytest.mark.parametrize("kl_coef,returns", [(BETA, RETURNS_REWARD), (0.0, RETURNS_NO_KL)])
def test_estimate_advantages_reinforce_pp_hand_worked(kl_coef, returns):
    valid = [v for row, n in zip(returns, STEP4_LENGTHS) for v in row[:n]]  # 9 tokens
    mean, var = statistics.fmean(valid), statistics.variance(valid)  # Bessel-corrected
    expected = [
        [(v - mean) / math.sqrt(var + 1e-8) if t < n else 0.0 for t, v in enumerate(row)]
        for row, n in zip(returns, STEP4_LENGTHS)
    ]
    adv = _step4("reinforce_pp", kl_coef)
    _close(adv.advantages, expected)
    _close(adv.returns, returns)


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce_pp"])
def test_with_beta_zero_the_advantages_ignore_the_kl(advantage):
    """kl.mode loss (β = 0): another KL changes nothing in step 4 (it acts in the loss)."""
    scores, stats, rollout = _step4_inputs()
    other = replace(stats, kl=stats.kl * 3 + 1)
    cfg = UpdateConfig(advantage=advantage)
    a = estimate_advantages(scores, stats, rollout, cfg, 0.0, LOCAL)
    b = estimate_advantages(scores, other, rollout, cfg, 0.0, LOCAL)
    assert torch.equal(a.advantages, b.advantages) and torch.equal(a.rewards, b.rewards)
    c = estimate_advantages(scores, other, rollout, cfg, BETA, LOCAL)
    assert not torch.equal(a.advantages, c.advantages)  # with β > 0 the KL counts


@pytest.mark.parametrize(
    "advantage,whiten_advantages,whitened",
    [("gae", None, True), ("gae", False, False), ("grpo", None, False), ("grpo", True, True),
     ("rloo", None, False), ("reinforce_pp", None, False), ("reinforce_pp", True, True)],
)  # fmt: skip
def test_whitening_null_is_on_for_gae_only(advantage, whiten_advantages, whitened):
    cfg = UpdateConfig(advantage=advantage, whiten_advantages=whiten_advantages)
    assert resolve_whitening(cfg) is whitened
    values = torch.tensor(
        [[0.5, 0.25, 0.0], [1.0, 0, 0], [0.0, 2.0, 0], [0.5, 0.5, 0.5]], dtype=F64
    )
    scores, stats, rollout = _step4_inputs(values if advantage == "gae" else None)
    mask = rollout.response_mask
    got = estimate_advantages(scores, stats, rollout, cfg, BETA, LOCAL).advantages
    if advantage == "gae":
        rewards = kl_penalised_rewards(scores.shaped, stats.kl, mask, BETA)
        raw = gae(rewards, values, mask, cfg.gamma, cfg.lam)[0]
    else:
        raw = _step4(advantage, BETA).advantages
    _close(got, whiten(raw, mask) if whitened else raw)
    valid = got[mask.bool()]
    if whitened:  # zero mean, unit (Bessel-corrected) variance over the 9 valid tokens
        assert abs(float(valid.mean())) < 1e-9 and float(valid.var()) == pytest.approx(1, abs=1e-6)


def test_gae_without_values_is_an_error():
    with pytest.raises(ValueError, match="update.advantage: gae needs critic values"):
        estimate_advantages(*_step4_inputs(None), UpdateConfig(advantage="gae"), BETA, LOCAL)
