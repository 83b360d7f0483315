"""Measure one benchmark case inside a fresh process (called by ``benchmarks.run --one``).

CPU: median wall time over ``repeats`` runs and peak RSS above the post-input baseline.
CUDA: ``triton.testing.do_bench`` quantiles, GB/s of the minimum traffic and
``torch.cuda.max_memory_allocated`` above the inputs.
"""

from __future__ import annotations

import gc
import importlib
import resource
import statistics
import time

import psutil
import torch

#: Peak HBM bandwidth (GB/s) by device-name substring, for the "% of peak" column.
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40": 864.0, "A10": 600.0}


def _loss(outs):
    """Sum of all outputs: upstream gradient 1 for logp, entropy and KL."""
    return sum(o.sum() for o in outs if o is not None)


def _step(fn, mode, leaves):
    for x in leaves:
        x.grad = None
    if mode == "forward":
        out = fn()
        del out
        return None
    loss = _loss(fn())
    if mode == "backward":
        t0 = time.perf_counter()
        loss.backward()
        return time.perf_counter() - t0
    loss.backward()
    return None


def _cpu(fn, mode, leaves, repeats):
    gc.collect()
    base = psutil.Process().memory_info().rss
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dt = _step(fn, mode, leaves)
        times.append(dt if dt is not None else time.perf_counter() - t0)
        gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "time_ms": 1e3 * statistics.median(times),
        "time_p20_ms": 1e3 * min(times),
        "time_p80_ms": 1e3 * max(times),
        "peak_mem_mb": max(0, peak - base) / 2**20,
    }


def _gpu(fn, mode, leaves, bytes_min):  # pragma: no cover - needs a CUDA device
    import triton.testing

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if mode == "backward":
        loss = _loss(fn())

        def run():
            loss.backward(retain_graph=True)

    else:

        def run():
            _step(fn, mode, [])

    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    med, p20, p80 = triton.testing.do_bench(run, quantiles=[0.5, 0.2, 0.8], grad_to_none=leaves)
    gbps = bytes_min / (med * 1e-3) / 1e9
    name = torch.cuda.get_device_name()
    peak_bw = next((v for k, v in PEAK_GBPS.items() if k in name), None)
    return {
        "time_ms": med,
        "time_p20_ms": p20,
        "time_p80_ms": p80,
        "peak_mem_mb": peak / 2**20,
        "gbps": gbps,
        "pct_peak_bw": None if peak_bw is None else 100 * gbps / peak_bw,
    }


def run_case(case: dict) -> dict:
    """Build the inputs for ``case`` and measure it; returns the case with result fields."""
    mod = importlib.import_module(f"benchmarks.bench_{case['family']}")
    cuda = torch.cuda.is_available()
    if case["provider"] == "triton" and not cuda:
        return {**case, "status": "skipped: triton provider needs a GPU"}
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, case["dtype"])
    fn, leaves, bytes_min = mod.make(
        case["provider"], case["n"], case["vocab"], case["hidden"], dtype, device
    )
    if cuda:
        res = _gpu(fn, case["mode"], leaves, bytes_min[case["mode"]])
    else:
        res = _cpu(fn, case["mode"], leaves, int(case.get("repeats", 3)))
    res["bytes_min_per_token"] = bytes_min[case["mode"]] / case["n"]
    res["threads"] = torch.get_num_threads()
    return {**case, **res, "status": "ok"}
