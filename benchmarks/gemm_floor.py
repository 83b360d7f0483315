"""The GEMM floor of the PPO workload, measured in-process on the machine at hand, per dtype.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.gemm_floor                       # float32
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.gemm_floor --dtypes float32 bfloat16

`gemm_floor(work, dtype)` = the workload's matmul FLOPs (`ppo_flop_floor.count_flops`: prefill,
decode, RM / reference forwards, the critic forward outside the first minibatch, policy and
critic forward + backward; counted once per
process and workload) ÷ the best `torch.mm` rate of the model's GEMM shapes in `dtype` on this
machine (separately for the decode steps, whose GEMMs have only batch_size rows), or of oneDNN's
linear where that is faster (float32: both are measured and recorded; the floor takes the better
library, since `kernels.onednn_linear` runs oneDNN on some CPUs). That decode
rate is the best single call, with the weight matrix in cache; a real decode step streams every
weight of the model from memory once, so `streamed_decode_rate` also times the decode GEMMs of
all layers and the LM head back to back (the model's own weight set, 540 MB in float32) and
`floor_s_padded_streamed` uses it — the floor of a decode bound by memory bandwidth. It is what
`bench_ppo_step` can call in the same run as the timed iterations, so that ours / floor is read
on one machine under one load. Also prints the CPU's bf16 capability (`cpu_bf16_support`), the
evidence behind docs/precision.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
from rlhf_lightning.kernels.dispatch import cpu_info

from benchmarks.ppo_flop_floor import best_gemm_rate, count_flops, gemm_shapes
from benchmarks.trl_ppo_baseline import VOCAB, Workload

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_bf16_support() -> dict:
    """What this CPU offers for 16-bit matmuls: torch's dispatch level and the /proc/cpuinfo flags
    (`avx512_bf16`: AVX-512 BF16 dot products; `amx_bf16`: Intel AMX tiles)."""
    _, flags = cpu_info()
    wanted = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "avx512f", "avx2")
    return {
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        **{flag: flag in flags for flag in wanted},
    }


@functools.lru_cache(maxsize=4)
def _flops(work_key: tuple) -> dict:
    work = Workload(**dict(work_key))
    return count_flops(work)


def workload_flops(work: Workload) -> dict:
    """`count_flops(work)` (matmul FLOPs per pass and the padding-free fraction), once per process."""
    from dataclasses import asdict

    return dict(_flops(tuple(sorted(asdict(work).items()))))


def streamed_decode_rate(work: Workload, dtype: torch.dtype = torch.float32, repeats: int = 3):
    """GFLOP/s of one decode step's GEMMs (batch_size rows) through every layer's projections
    and the LM head, each with its own weights (so they come from memory, as in `generate`):
    the best of `repeats` passes."""
    head_dim = work.hidden // work.heads
    kv = work.kv_heads * head_dim
    h, i = work.hidden, work.intermediate
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)] * work.layers  # (in, out)
    shapes.append((h, VOCAB))
    weights = [torch.randn(n_out, n_in).to(dtype) for n_in, n_out in shapes]
    inputs = {n_in: torch.randn(work.batch_size, n_in).to(dtype) for n_in, _ in shapes}
    flops = sum(2 * work.batch_size * n_in * n_out for n_in, n_out in shapes)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        t0 = time.perf_counter()
        for w in weights:
            torch.mm(inputs[w.shape[1]], w.t())
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def _library_rates(work: Workload, rows: int, dtype: torch.dtype) -> dict:
    """Best dense and decode GEMM rates of torch.mm and (float32 with oneDNN in this torch) of
    oneDNN's linear, each library's and the better of the two (what the floor divides by)."""
    dense_shapes = gemm_shapes(work, rows) + [(2048, 2048, 2048)]
    decode_shapes = gemm_shapes(work, work.batch_size)
    libraries = ["torch"]
    if dtype == torch.float32 and torch.backends.mkldnn.is_available():
        libraries.append("onednn")
    out = {}
    for lib in libraries:
        out[f"gemm_gflops_{lib}"] = best_gemm_rate(dense_shapes, dtype=dtype, library=lib)
        out[f"decode_gemm_gflops_{lib}"] = best_gemm_rate(decode_shapes, dtype=dtype, library=lib)
    out["gemm_gflops"] = max(out[f"gemm_gflops_{lib}"] for lib in libraries)
    out["decode_gemm_gflops"] = max(out[f"decode_gemm_gflops_{lib}"] for lib in libraries)
    return out


def gemm_floor(work: Workload, dtype: torch.dtype = torch.float32) -> dict:
    """Rates (GFLOP/s) and floor seconds (padded, padding-free) of one PPO iteration in `dtype`."""
    flops = workload_flops(work)
    fraction = flops.pop("padding_free_fraction")
    per_minibatch = ("policy_forward_backward", "critic_forward_backward")
    extra_epochs = sum(flops[k] for k in per_minibatch) * (work.ppo_epochs - 1)
    dense = sum(v for k, v in flops.items() if k != "decode") + extra_epochs
    rows = work.batch_size * work.prompt_width
    rates = _library_rates(work, rows, dtype)
    rate, decode_rate = rates["gemm_gflops"], rates["decode_gemm_gflops"]
    decode_s = flops["decode"] / decode_rate / 1e9
    streamed_rate = streamed_decode_rate(work, dtype)
    streamed_s = flops["decode"] / streamed_rate / 1e9
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "tflops_total_padded": round((dense + flops["decode"]) / 1e12, 4),
        **{k: round(v, 1) for k, v in rates.items()},
        "floor_s_padded": round(dense / rate / 1e9 + decode_s, 2),
        "floor_s_padding_free": round(dense * fraction / rate / 1e9 + decode_s, 2),
        "decode_streamed_gemm_gflops": round(streamed_rate, 1),
        "floor_s_padded_streamed": round(dense / rate / 1e9 + streamed_s, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Workload(threads=args.threads)
    result = {
        "cpu": cpu_bf16_support(),
        "floors": [gemm_floor(work, DTYPES[d]) for d in args.dtypes],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
