"""Data-parallel tests: SFT, RM and PPO on 2 CPU ranks (DDP, gloo) against 1 process.

The runs come from `_driver.py` (see conftest.py). Checked, per stage:
  - parameters bit-identical on both ranks after several steps; each rank saw different rows,
    and the two ranks' rows of a step are exactly the 1-process batch of that step;
  - equivalence: the gradients of the first optimizer step and the parameters after the last
    equal those of 1 process with the whole global batch (SFT / RM batches; PPO on fixed,
    prompt-determined responses so that sampling cannot differ);
  - PPO statistics are global: whitening, the KL the adaptive controller measures, running
    reward moments, monitor signals and every logged metric equal the 1-process values;
  - a PPO run checkpointed on 2 ranks and resumed on 2 ranks equals the straight run.

Tolerances: a 2-rank float32 run must be as close to the 1-process float64 run as the 1-process
float32 run is: error ≤ 2 × the single-process float32 error + `ATOL` (relative to the
reference's scale). A data-parallel bug (a per-rank statistic, a wrong token normalisation, both
ranks on the same data) moves results by 1e-2 or more; float32 rounding by ~1e-7.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

pytestmark = pytest.mark.slow  # ~50 s together on 2 CPU cores; `make test` runs them

ATOL = 1e-6
"""Allowance on top of 2× the single-process float32 error, relative to the reference's scale
(≈ 8 float32 ulps: the two runs add the same numbers in different orders)."""


def relative_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """‖got − ref‖ / ‖ref‖ over all tensors of two name → tensor dicts (in float64)."""
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    diff = sum(((got[k].double() - ref[k].double()) ** 2).sum() for k in ref)
    norm = sum((ref[k].double() ** 2).sum() for k in ref)
    return math.sqrt(float(diff) / max(float(norm), 1e-300))


def assert_tensors_close(ddp: dict, single: dict, ref: dict, what: str) -> None:
    """`ddp[what]` (2 ranks, float32) vs `single[what]` (1 process, float32), both vs `ref`."""
    e_ddp, e_single = relative_error(ddp[what], ref[what]), relative_error(single[what], ref[what])
    assert e_ddp <= 2 * e_single + ATOL, (
        f"{what}: 2-rank error {e_ddp:.3g} vs 1-process float32 error {e_single:.3g} "
        f"(relative to float64; allowed {2 * e_single + ATOL:.3g})"
    )


def assert_scalars_close(name: str, ddp: list, single: list, ref: list) -> None:
    """Sequences of floats: same NaN positions; max |ddp − ref| ≤ 2·max |single − ref| + ATOL·s."""
    ddp_t, single_t, ref_t = (torch.tensor(v, dtype=torch.float64) for v in (ddp, single, ref))
    nan = ref_t.isnan()
    assert torch.equal(ddp_t.isnan(), nan) and torch.equal(single_t.isnan(), nan), name
    keep = ~nan
    e_ddp, e_single = _max_abs((ddp_t - ref_t)[keep]), _max_abs((single_t - ref_t)[keep])
    scale = max(1.0, _max_abs(ref_t[keep]))
    allowed = 2 * e_single + ATOL * scale
    assert e_ddp <= allowed, f"{name}: 2-rank error {e_ddp:.3g} > allowed {allowed:.3g} {ddp}"


def _max_abs(values: torch.Tensor) -> float:
    return float(values.abs().max()) if values.numel() else 0.0


def assert_same_across_ranks(rank0: dict, rank1: dict) -> None:
    """Parameters bit-identical on both ranks (DDP gives every rank the same averaged gradient)."""
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), f"{name} differs between the ranks"


def assert_global_batches(rank0: list, rank1: list, single: list, micro_per_step: int = 1):
    """Each optimizer step, the two ranks saw different rows that together are exactly the
    single-process batch of that step. Rows are recorded per (micro-)batch."""
    steps = len(single)
    assert len(rank0) == len(rank1) == steps * micro_per_step
    for step in range(steps):
        window = slice(step * micro_per_step, (step + 1) * micro_per_step)
        seen0 = Counter(row for batch in rank0[window] for row in batch)
        seen1 = Counter(row for batch in rank1[window] for row in batch)
        assert seen0 != seen1, f"step {step}: both ranks got the same rows"
        assert seen0 + seen1 == Counter(single[step]), f"step {step}: ranks ≠ the global batch"


def _runs(results, scenario: str) -> tuple[dict, dict, dict, dict]:
    """(rank 0, rank 1) of the 2-rank float32 run, the 1-process float32 and float64 runs."""
    return (
        results.load(scenario, 2, rank=0),
        results.load(scenario, 2, rank=1),
        results.load(scenario, 1),
        results.load(scenario, 1, "64-true"),
    )


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sft_and_rm_two_ranks_equal_one_process(ddp_results, stage):
    """3 steps, global batch 4: SFT as 1 row × accumulate 2 per rank (the per-token mean over all
    ranks' tokens), RM as 2 prompts per rank (pairs and 3-way rankings, per-prompt mean)."""
    rank0, rank1, single, ref = _runs(ddp_results, stage)
    assert_same_across_ranks(rank0, rank1)
    micro = 2 if stage == "sft" else 1
    assert_global_batches(rank0["rows"], rank1["rows"], single["rows"], micro)
    assert_tensors_close(rank0, single, ref, "grads")
    assert_tensors_close(rank0, single, ref, "params")


def test_ppo_update_on_fixed_rollouts_equals_one_process(ddp_results):
    """4 PPO iterations × 2 epochs on prompt-determined responses, 4 prompts per rank vs 8 in one
    process: same prompts per iteration, same first-step gradients (policy and critic), same
    parameters at the end, identical on both ranks."""
    rank0, rank1, single, ref = _runs(ddp_results, "ppo_fixed")
    assert_same_across_ranks(rank0, rank1)
    assert_global_batches(rank0["rows"], rank1["rows"], single["rows"])
    assert any(name.startswith("critic.") for name in rank0["grads"])
    assert_tensors_close(rank0, single, ref, "grads")
    assert_tensors_close(rank0, single, ref, "params")


def test_ppo_statistics_are_global(ddp_results):
    """Whitening, the adaptive KL controller's measured KL, the running reward moments, the
    monitor and every logged metric (but ppo/perf/*) equal the 1-process values on both ranks."""
    rank0, rank1, single, ref = _runs(ddp_results, "ppo_fixed")
    for key in ("kl_coef", "running", "monitor"):
        assert _nan_equal(rank0[key], rank1[key]), key
    assert _nan_equal(*(_without_perf(run["history"]) for run in (rank0, rank1)))
    assert len(rank0["history"]) == len(ref["history"]) == 4
    keys = [k for k in ref["history"][0] if not k.startswith("ppo/perf/")]
    assert {
        "ppo/advantages/mean",
        "ppo/objective/kl",
        "ppo/monitor/distinct_2",
        "ppo/loss/ptx",
    } <= set(keys)
    assert set(keys) == {k for k in rank0["history"][0] if not k.startswith("ppo/perf/")}
    for key in keys:
        values = [[h[key] for h in run["history"]] for run in (rank0, single, ref)]
        assert_scalars_close(key, *values)
    assert_scalars_close("kl_coef", *([run["kl_coef"]] for run in (rank0, single, ref)))
    assert rank0["kl_coef"] != 0.05  # the adaptive controller moved
    assert rank0["running"]["count"] == ref["running"]["count"] == 4 * 8
    for key in ("mean", "m2"):
        assert_scalars_close(f"running.{key}", *([r["running"][key]] for r in (rank0, single, ref)))
    monitor, ref_monitor = rank0["monitor"], ref["monitor"]
    assert monitor["baseline_distinct"] == ref_monitor["baseline_distinct"]
    for key in ("proxy", "gold"):
        assert_scalars_close(
            f"monitor.{key}", monitor[key], single["monitor"][key], ref_monitor[key]
        )


def _without_perf(history: list[dict]) -> list[dict]:
    """Metric history without the timings (`ppo/perf/*`, this rank's wall-clock)."""
    return [{k: v for k, v in h.items() if not k.startswith("ppo/perf/")} for h in history]


def _nan_equal(a, b) -> bool:
    """Equality of nested metric structures where NaN equals NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_nan_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_nan_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_ppo_checkpoint_and_resume_on_two_ranks_equals_straight_run(ddp_results):
    """Sampled PPO on 2 ranks, 2 epochs × 3 iterations; checkpoint after iteration 2 (mid-epoch),
    resume on 2 ranks: iterations 3–6 (metrics, data, KL, moments, monitor, parameters) are those
    of the straight run — each rank resumes its own data shard and its own sampling RNG."""
    load = ddp_results.load
    straight = [load("ppo_resume:straight", 2, rank=r) for r in (0, 1)]
    resumed = [load("ppo_resume:resumed", 2, rank=r) for r in (0, 1)]
    for run in (straight, resumed):
        assert_same_across_ranks(*run)
    first_epoch = straight[0]["rows"][:3] + straight[1]["rows"][:3]
    prompts = straight[0]["prompts"]
    assert len(prompts) == 24
    assert len([p for batch in first_epoch for p in batch]) == 24
    for prompt in prompts:  # each of the 24 prompts once, on one of the ranks
        count = sum(f": {prompt}\n" in p for batch in first_epoch for p in batch)
        assert count == prompts.count(prompt), prompt
    assert straight[0]["rows"][:3] != straight[1]["rows"][:3]
    assert not torch.equal(straight[0]["rng"], straight[1]["rng"])  # ranks sample differently
    assert straight[0]["rows"][3:] != straight[0]["rows"][:3]  # epoch 2 is reshuffled
    for rank in (0, 1):
        assert resumed[rank]["rows"] == straight[rank]["rows"][2:]
    a, b = straight[0], resumed[0]
    assert len(a["history"]) == len(b["history"]) == 6
    for i, (x, y) in enumerate(zip(_without_perf(a["history"]), _without_perf(b["history"]))):
        differ = [k for k in x if not _nan_equal(x[k], y.get(k))]
        assert not differ, f"iteration {i + 1}: resumed ≠ straight for {differ}"
    for key in ("kl_coef", "running", "monitor"):
        assert _nan_equal(a[key], b[key]), key
    for name, value in a["params"].items():
        assert torch.equal(value, b["params"][name]), name
