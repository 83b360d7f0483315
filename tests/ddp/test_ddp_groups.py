"""Critic-free estimators on 2 CPU ranks (DDP, gloo) against 1 process with the global batch.

The runs come from `_driver.py` (scenarios `grpo_fixed`, `reinforce_pp_fixed`: 2 iterations,
k = 2 samples per prompt on fixed, prompt-determined responses whose length differs within most
groups; 4 prompts per rank vs 8 in one process). Checked:
  - every group is whole on its rank (k rows, one prompt each) and the ranks' groups together are
    the 1-process groups of that iteration (each rank draws its prompts, then repeats them);
  - one GRPO / REINFORCE++ run on 2 ranks equals 1 process: first-step gradients, final
    parameters and every logged metric (the group tags and REINFORCE++'s batch normalisation
    are over both ranks), judged with the rule of test_ddp_stages.py (2 × the 1-process float32
    error against float64 + ATOL).
Deliberate breaks these checks catch (run by hand when they were written): per-rank moments in
REINFORCE++, a per-rank token count in the update's divisor, per-rank group tags, group ids
that do not follow the prompts.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.ddp.conftest import Results, run_driver
from tests.ddp.test_ddp_stages import (
    _runs,
    _without_perf,
    assert_global_batches,
    assert_same_across_ranks,
    assert_scalars_close,
    assert_tensors_close,
)

pytestmark = pytest.mark.slow  # ~35 s on 2 CPU cores (two driver runs)

SCENARIOS = ["grpo_fixed", "reinforce_pp_fixed"]
K = 2


@pytest.fixture(scope="module")
def group_results(tmp_path_factory) -> Results:
    single = tmp_path_factory.mktemp("groups_single")
    ddp = tmp_path_factory.mktemp("groups_two_ranks")
    run_driver(single, 1, "32-true,64-true", ",".join(SCENARIOS))
    run_driver(ddp, 2, "32-true", ",".join(SCENARIOS))
    return Results(single, ddp)


def _groups(rollout: dict) -> dict[int, list[str]]:
    """Group id → the prompts of its rows, of one recorded rollout."""
    members: dict[int, list[str]] = {}
    for g, prompt in zip(rollout["group"], rollout["prompts"]):
        members.setdefault(g, []).append(prompt)
    return members


def _assert_whole(rollout: dict) -> Counter:
    """Every group has k rows of one prompt, adjacent; returns Counter(prompt → groups)."""
    groups = _groups(rollout)
    ids = rollout["group"]
    assert ids == sorted(ids), f"groups not adjacent: {ids}"
    for g, prompts in groups.items():
        assert len(prompts) == K and len(set(prompts)) == 1, (g, prompts)
    return Counter(prompts[0] for prompts in groups.values())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_groups_stay_whole_on_each_rank(group_results, scenario):
    rank0, rank1, single, _ = _runs(group_results, scenario)
    assert len(rank0["rollouts"]) == len(single["rollouts"]) == 2
    for it, whole in enumerate(single["rollouts"]):
        per_rank = [_assert_whole(run["rollouts"][it]) for run in (rank0, rank1)]
        assert sum(per_rank[0].values()) == sum(per_rank[1].values()) == 4  # prompts per rank
        assert per_rank[0] != per_rank[1], f"iteration {it}: both ranks got the same prompts"
        assert per_rank[0] + per_rank[1] == _assert_whole(whole), f"iteration {it}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_critic_free_two_ranks_equal_one_process(group_results, scenario):
    """Same prompts per iteration, same first-step gradients and final parameters, identical on
    both ranks; no critic anywhere."""
    rank0, rank1, single, ref = _runs(group_results, scenario)
    assert_same_across_ranks(rank0, rank1)
    assert_global_batches(rank0["rows"], rank1["rows"], single["rows"])
    assert not any("critic" in name or "value_head" in name for name in rank0["params"])
    assert_tensors_close(rank0, single, ref, "grads")
    assert_tensors_close(rank0, single, ref, "params")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_critic_free_statistics_are_global(group_results, scenario):
    """Every logged metric (but ppo/perf/*) equals the 1-process value on both ranks, the group
    tags included; REINFORCE++'s advantages are normalised over both ranks (mean ≈ 0)."""
    rank0, rank1, single, ref = _runs(group_results, scenario)
    assert _without_perf(rank0["history"]) == _without_perf(rank1["history"])
    keys = [k for k in ref["history"][0] if not k.startswith("ppo/perf/")]
    assert {"ppo/objective/group_reward_std", "ppo/objective/zero_advantage_groups",
            "ppo/loss/ptx"} <= set(keys)  # fmt: skip
    assert "ppo/loss/value" not in keys
    assert set(keys) == {k for k in rank0["history"][0] if not k.startswith("ppo/perf/")}
    for key in keys:
        values = [[h[key] for h in run["history"]] for run in (rank0, single, ref)]
        assert_scalars_close(key, *values)
    for h in ref["history"]:
        assert h["ppo/objective/zero_advantage_groups"] < 1.0  # the groups carry a signal
    if scenario == "reinforce_pp_fixed":
        assert all(abs(h["ppo/advantages/mean"]) < 1e-6 for h in rank0["history"])
