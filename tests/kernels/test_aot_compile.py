"""Every Triton kernel specialisation the launchers can produce compiles for sm_80 and sm_90.

Runs ``python -m rlhf_lightning.kernels.aot`` once (module fixture) in a subprocess with
``TRITON_INTERPRET`` unset: tests/conftest.py turns the interpreter on for the other kernel
tests, and ``@triton.jit`` reads it when the kernels are defined. No GPU is needed (Triton's
own LLVM and bundled ptxas); the run compiles 256 specialisations × 2 targets with 2 worker
processes, 1–3 min on 2 cores, hence ``slow`` (``make test`` runs it, ``make test-fast`` not).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rlhf_lightning.kernels import _FLOATS, aot
from rlhf_lightning.kernels import triton_token_stats as tts

pytestmark = pytest.mark.slow

DOCS = Path(__file__).resolve().parents[2] / "docs" / "kernels.md"
_TORCH_TO_TRITON = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


@pytest.fixture(scope="module")
def aot_run(tmp_path_factory):
    """``(report dict, completed process)`` of one AOT run."""
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "rlhf_lightning.kernels.aot", "--json", str(out), "--workers", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), f"no report (exit {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(out.read_text()), proc


@pytest.fixture(scope="module")
def report(aot_run):
    return aot_run[0]


def _results(report):
    """``(label, entry, target result)`` for every specialisation × target."""
    for e in report["specialisations"]:
        label = (
            f"{e['kernel']} {e['constexprs']} warps={e['num_warps']} z={e['signature']['z_ptr']}"
        )
        for target, r in e["targets"].items():
            yield f"{label} {target}", e, r


def test_run_is_clean_and_exit_status_says_so(aot_run):
    report, proc = aot_run
    assert report["violations"] == [], "\n".join(report["violations"][:20])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_distinct_recorded_launch_is_compiled_for_both_targets(report):
    specs = report["specialisations"]
    assert len(specs) > 0
    assert len(specs) == report["distinct_launches"]
    assert report["launches_recorded"] >= len(specs)
    ids = {
        json.dumps([e["kernel"], e["signature"], e["constexprs"], e["num_warps"]]) for e in specs
    }
    assert len(ids) == len(specs), "two recorded launches map to the same compiled kernel"
    assert report["targets"] == ["sm_80", "sm_90"]
    assert all(set(e["targets"]) == {"sm_80", "sm_90"} for e in specs)


def test_enumeration_reaches_every_dtype_block_and_alignment(report):
    """The recorded set spans the launcher's own choices (read from the module, not copied)."""
    specs = report["specialisations"]
    for kernel in ("_token_stats_fwd_kernel", "_token_stats_bwd_kernel"):
        mine = [e for e in specs if e["kernel"] == kernel]
        dtypes = {e["signature"]["z_ptr"] for e in mine}
        assert dtypes == {"*" + _TORCH_TO_TRITON[str(d).split(".")[1]] for d in _FLOATS}
        assert {e["constexprs"]["BLOCK_V"] for e in mine} == set(tts.GPU_BLOCKS_V)
        assert {e["constexprs"]["ALIGNED"] for e in mine} == {False, True}


def test_every_specialisation_compiles(report):
    failed = [f"{label}: {r['error']}" for label, _, r in _results(report) if not r["ok"]]
    assert not failed, "\n".join(failed[:20])


def test_no_local_memory_and_no_spills(report):
    bad = [
        f"{label}: {r['ptx_local_ops']} ld/st.local, {r['spill_store_bytes']} B spilled, "
        f"{r['stack_bytes']} B stack"
        for label, _, r in _results(report)
        if r["ok"]
        and (r["ptx_local_ops"] or r["n_spills"] or r["spill_store_bytes"] or r["stack_bytes"])
    ]
    assert not bad, "\n".join(bad[:20])


def test_every_16bit_conversion_rounds_to_nearest(report):
    bad = [
        f"{label}: {r['cvt_16bit_not_rn']}"
        for label, _, r in _results(report)
        if r["ok"] and r["cvt_16bit_not_rn"]
    ]
    assert not bad, "\n".join(bad[:20])
    # The backward stores dz in the input dtype: 16-bit variants must convert with cvt.rn.
    for label, e, r in _results(report):
        if e["kernel"] == "_token_stats_bwd_kernel" and e["signature"]["dz_ptr"] in (
            "*bf16",
            "*fp16",
        ):
            assert r["cvt_16bit"] and all(".rn." in c for c in r["cvt_16bit"]), label


def test_runtime_values_add_no_specialisation(report):
    """Only dtypes, constexprs and launch options vary, so the enumeration is complete."""
    bad = [
        f"{label}: {e['value_specialised']}"
        for label, e, _ in _results(report)
        if e["value_specialised"]
    ]
    assert not bad, "\n".join(bad[:20])


def test_aligned_variants_vectorise_their_loads(report):
    bad = [
        label
        for label, e, r in _results(report)
        if r["ok"] and e["constexprs"]["ALIGNED"] and not r["vector_global_loads"]
    ]
    assert not bad, "\n".join(bad[:20])


def test_docs_table_matches_this_compilation(report):
    """docs/kernels.md carries the table this run prints (regenerate: see the docs section)."""
    table = aot.markdown(report)
    assert table in DOCS.read_text(), (
        "docs/kernels.md resource table is stale: regenerate with "
        "`python -m rlhf_lightning.kernels.aot --markdown` (TRITON_INTERPRET unset)"
    )
