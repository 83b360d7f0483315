"""Shared benchmark runner: ``python -m benchmarks.run --suite cpu|gpu``.

Each case runs in a fresh subprocess (``--one <json>``) so that its peak memory is its own:
on CPU the peak RSS (``ru_maxrss``) minus the RSS after the inputs were built, and the
median wall time over ``repeats`` runs; on CUDA ``triton.testing.do_bench`` quantiles
(median, p20, p80), GB/s against the minimum bytes and ``max_memory_allocated`` above the
inputs. Rows are appended to ``benchmarks/results/results.csv`` (with machine, versions and
git sha); ``latest_<suite>.md`` (table + target ratios) and ``latest_<suite>.png`` are
rewritten. Layout after Liger-Kernel's benchmark folder (one script per op family).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from . import report
from .results_io import append_csv, git_sha, utc_timestamp
from .trl_ppo_baseline import cpu_model, warn_if_loaded

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = ("token_stats", "linear_token_stats")
# The acceptance case of issue #3: CPU, float32, N=2048, H=896, V=151936, fwd+bwd.
TARGET = {"n": 2048, "vocab": 151936, "hidden": 896, "mode": "full", "dtype": "float32"}


def _case(family, provider, mode, n, vocab, hidden, repeats=3, dtype="float32", **extra):
    return dict(
        family=family,
        provider=provider,
        mode=mode,
        n=n,
        vocab=vocab,
        hidden=hidden,
        dtype=dtype,
        repeats=repeats,
        **extra,
    )


def cpu_suite() -> list[dict]:
    """CPU subset sized for ≤ 10 minutes on 2 cores; always includes the target case."""
    cases = []
    for prov in ("naive", "trl", "chunked"):
        cases.append(_case("token_stats", prov, "full", **_target_shape(), repeats=2))
    for prov in ("naive", "chunked"):
        cases.append(_case("linear_token_stats", prov, "full", **_target_shape(), repeats=1))
    for vocab in (32000, 128256):
        for mode in ("forward", "backward", "full"):
            for prov in ("naive", "trl", "chunked"):
                cases.append(_case("token_stats", prov, mode, 512, vocab, 0, repeats=3))
    for vocab, hidden in ((32000, 576), (49152, 896), (32000, 4096)):
        for prov in ("naive", "chunked"):
            cases.append(_case("linear_token_stats", prov, "full", 256, vocab, hidden, repeats=3))
    return cases


def gpu_suite() -> list[dict]:
    """Every V × H × mode × provider at N=4096 tokens (float32 and bfloat16)."""
    cases = []
    for dtype in ("bfloat16", "float32"):
        for vocab in (32000, 49152, 128256, 151936):
            for mode in ("forward", "backward", "full"):
                for prov in ("naive", "trl", "chunked", "triton"):
                    cases.append(_case("token_stats", prov, mode, 4096, vocab, 0, dtype=dtype))
                for hidden in (576, 896, 4096):
                    for prov in ("naive", "chunked"):
                        cases.append(
                            _case(
                                "linear_token_stats", prov, mode, 4096, vocab, hidden, dtype=dtype
                            )
                        )
    return cases


def _target_shape():
    return {"n": TARGET["n"], "vocab": TARGET["vocab"], "hidden": TARGET["hidden"]}


def _machine() -> dict:
    import torch

    cpu = cpu_model()
    try:
        import triton

        triton_v = triton.__version__
    except Exception:  # pragma: no cover
        triton_v = "none"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return {
        "machine": f"{platform.node()} | {cpu} x{os.cpu_count()}" + (f" | {gpu}" if gpu else ""),
        "torch": torch.__version__,
        "triton": triton_v,
        "git_sha": git_sha(),
    }


def _run_child(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.run", "--one", json.dumps(case)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**case, "status": f"timeout>{timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {**case, "status": f"error: {err}"}
    row = json.loads(lines[-1])
    row["case_wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--one", help="(internal) run a single JSON case in this process")
    ap.add_argument("--only", default="", help="substring filter on 'family/provider/mode/V'")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    args = ap.parse_args(argv)
    if args.one:
        from .measure import run_case

        print(json.dumps(run_case(json.loads(args.one))), flush=True)
        return 0
    cases = cpu_suite() if args.suite == "cpu" else gpu_suite()
    if args.only:
        cases = [c for c in cases if args.only in report.case_key(c)]
    meta = _machine()
    meta["loadavg_1m"] = round(warn_if_loaded("timings and ratios"), 2)
    stamp = utc_timestamp()
    rows = []
    t_start = time.perf_counter()
    for i, case in enumerate(cases, 1):
        row = {**_run_child(case, args.timeout), **meta, "timestamp": stamp, "suite": args.suite}
        rows.append(row)
        print(f"[{i}/{len(cases)}] {report.format_row(row)}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    append_csv(RESULTS / "results.csv", rows, report.CSV_FIELDS)
    md = report.markdown(rows, meta, TARGET)
    (RESULTS / f"latest_{args.suite}.md").write_text(md)
    report.plot(rows, RESULTS / f"latest_{args.suite}.png")
    print(md.split("## All cases")[0])
    print(f"total {time.perf_counter() - t_start:.0f}s; results in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
