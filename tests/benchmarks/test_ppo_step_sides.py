"""The PPO-iteration benchmark's bookkeeping (`benchmarks/bench_ppo_step.py`, `ppo_sides.py`):
grouped prompt batches keep the PPO workload's shapes, per-process peak RSS comes from the child,
and `ppo_step.csv` gains the new columns without losing old rows. No timing is asserted.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `benchmarks` is not installed

from benchmarks import ppo_sides  # noqa: E402
from benchmarks.bench_ppo_step import _prompt_batches  # noqa: E402
from benchmarks.trl_ppo_baseline import Workload, build_tokenizer  # noqa: E402
from rlhf_lightning.ppo.rollout import PromptBatch, trim_left_padding  # noqa: E402


@pytest.mark.parametrize("samples", [2, 4])
def test_grouped_batches_match_ppo_rows_and_width(samples):
    work = Workload(iterations=3)
    tokenizer = build_tokenizer()
    plain = _prompt_batches(work, tokenizer, 3)
    grouped = _prompt_batches(work, tokenizer, 3, samples)
    for ppo_batch, group_batch in zip(plain, grouped, strict=True):
        repeated, group = PromptBatch.from_batch(group_batch).repeat(samples)
        ids, _ = trim_left_padding(repeated.input_ids, repeated.attention_mask)
        ppo_ids, _ = trim_left_padding(ppo_batch["input_ids"], ppo_batch["attention_mask"])
        assert ids.shape == ppo_ids.shape  # same rows per iteration and same trimmed width
        assert group.tolist() == [
            g for g in range(work.batch_size // samples) for _ in range(samples)
        ]
        # the grouped prompts are prompts of the same PPO batch
        ppo_rows = {tuple(r) for r in ppo_batch["input_ids"].tolist()}
        assert {tuple(r) for r in group_batch["input_ids"].tolist()} <= ppo_rows


def test_run_measured_reports_the_child_peak_and_fails_loudly():
    size_mb = 300
    code = f"b = bytearray({size_mb} * 2**20); b[::4096] = b'x' * len(b[::4096])"
    peak = ppo_sides.run_measured([sys.executable, "-c", code])
    assert peak >= size_mb
    assert ppo_sides.self_peak_rss_mb() > 0
    with pytest.raises(subprocess.CalledProcessError):
        ppo_sides.run_measured([sys.executable, "-c", "raise SystemExit(3)"])


def test_append_rows_upgrades_an_old_header(tmp_path):
    path = tmp_path / "ppo_step.csv"
    old_fields = ppo_sides.CSV_FIELDS[:-4]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=old_fields)
        writer.writeheader()
        writer.writerow({"impl": "trl", "iteration_s": 1.5})
    ppo_sides.append_rows(path, [{"impl": "rlhf_lightning", "peak_rss_mb": 12.0}], {"git_sha": "x"})
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames) == ppo_sides.CSV_FIELDS
    assert [r["impl"] for r in rows] == ["trl", "rlhf_lightning"]
    assert rows[0]["iteration_s"] == "1.5" and rows[0]["peak_rss_mb"] == ""
    assert rows[1]["peak_rss_mb"] == "12.0" and rows[1]["git_sha"] == "x"


def test_append_rows_refuses_a_foreign_header(tmp_path):
    path = tmp_path / "ppo_step.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="unexpected header"):
        ppo_sides.append_rows(path, [{"impl": "x"}], {})


def test_streamed_decode_rate_counts_every_layer_and_the_head(monkeypatch):
    from benchmarks import gemm_floor

    work = Workload(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2)
    calls = []
    real_mm = gemm_floor.torch.mm

    def counting_mm(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real_mm(a, b)

    monkeypatch.setattr(gemm_floor.torch, "mm", counting_mm)
    rate = gemm_floor.streamed_decode_rate(work, repeats=1)
    per_pass = 7 * work.layers + 1  # q, k, v, o, gate, up, down per layer + LM head
    assert len(calls) == 2 * per_pass  # warm-up pass + 1 timed pass
    assert calls[per_pass - 1] == ((8, 64), (64, gemm_floor.VOCAB))  # batch_size rows, the head
    assert {a[0] for a, _ in calls} == {work.batch_size}
    assert rate > 0


def test_print_floor_reports_the_streamed_floor(capsys):
    floor = {
        "floor_s_padded": 10.0,
        "floor_s_padding_free": 9.0,
        "gemm_gflops": 200.0,
        "decode_gemm_gflops": 100.0,
        "tflops_total_padded": 2.79,
        "decode_streamed_gemm_gflops": 40.0,
        "floor_s_padded_streamed": 11.0,
    }
    out = ppo_sides.print_floor(floor, [("PPOModule", {"iteration_s": 22.0})])
    printed = capsys.readouterr().out
    assert out == {"ratio_vs_floor": 2.2}
    assert "PPOModule / floor = 2.20 (target ≤ 1.25: NOT met)" in printed
    assert "floor 11.00 s, PPOModule / streamed floor = 2.00" in printed


def test_summarise_takes_the_os_counters_only_when_every_timed_row_has_them():
    from benchmarks.trl_ppo_baseline import OS_KEYS, os_counters, os_delta, summarise

    work = Workload(iterations=3)
    phases = dict(iteration_s=2.0, iteration_cpu_s=3.0, rollout_s=1, score_s=1, logprob_s=1)
    rows = [
        {**phases, "update_s": u, "iteration_sys_s": u / 10, "minor_faults": 10 * u}
        for u in (9, 1, 3)
    ]
    both = summarise(rows, work)  # the first row is the warm-up
    assert (both["iteration_sys_s"], both["minor_faults"]) == (0.2, 20)
    rows[2].pop("minor_faults")
    partial = summarise(rows, work)
    assert "minor_faults" not in partial and partial["iteration_sys_s"] == 0.2
    start = os_counters()
    bytearray(8 << 20)  # touch some fresh memory
    delta = os_delta(start)
    assert set(delta) == set(OS_KEYS) and all(v >= 0 for v in delta.values())
