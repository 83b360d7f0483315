"""The CPU decode kernel (`rlhf_lightning.kernels.cpu_decode`) against torch's linear, on the PPO
workload's model (issue #13).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_decode_linear

Two measurements, both with `--rows` rows (the decode batch, 8 by default):

1. Per weight class (q, k, v, o, gate, up, down of every layer; the LM head), the model's own
   set of distinct weights run back to back — as a decode step streams them from memory — with
   `torch.nn.functional.linear` (MKL) and with the kernel (`cpu_decode.decode_linear`, the
   call `generate` makes once `suits` has said yes): µs per call and GB/s of weights read. Each class's result is checked against the float64 reference (max error / torch's).
2. One KV-cached decode step of the whole Hugging Face model (prefill of `--rows` prompts of 128
   tokens first), steps alternating torch / kernel so that drift hits both: median ms.

Prints a table and writes `results/decode_linear.json` (CPU model, threads, torch version,
git sha). The kernel is built first if needed (~30 s, not timed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from rlhf_lightning.kernels import cpu_decode

from benchmarks.results_io import git_sha, utc_timestamp
from benchmarks.trl_ppo_baseline import RESULTS, VOCAB, Workload, cpu_model, llama_config


def weight_classes(work: Workload) -> dict[str, tuple[int, int, int]]:
    """name → (out features N, in features K, count) of the workload model's linear layers."""
    head = work.hidden // work.heads
    kv = work.kv_heads * head
    n = work.layers
    return {
        "q_proj": (work.hidden, work.hidden, n),
        "k_proj": (kv, work.hidden, n),
        "v_proj": (kv, work.hidden, n),
        "o_proj": (work.hidden, work.hidden, n),
        "gate_proj": (work.intermediate, work.hidden, n),
        "up_proj": (work.intermediate, work.hidden, n),
        "down_proj": (work.hidden, work.intermediate, n),
        "lm_head": (VOCAB, work.hidden, 1),
    }


def _median_pass(fn, weights, x, repeats: int) -> float:
    """Median seconds of one pass of `fn(x, w)` over all `weights`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            fn(x, w)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_class(work: Workload, rows: int, repeats: int) -> list[dict]:
    """Item 1 of the module docstring: one dict per weight class."""
    out = []
    for name, (n, k, count) in weight_classes(work).items():
        gen = torch.Generator().manual_seed(0)
        weights = [torch.randn(n, k, generator=gen) / k**0.5 for _ in range(count)]
        x = torch.randn(rows, k, generator=gen)
        exact = cpu_decode.decode_linear_ref(x, weights[0])
        err_torch = (F.linear(x, weights[0]) - exact).abs().max().item()
        err_kernel = (cpu_decode.decode_linear(x, weights[0]) - exact).abs().max().item()
        scale = exact.abs().max().item()
        t_torch = _median_pass(F.linear, weights, x, repeats)
        t_kernel = _median_pass(cpu_decode.decode_linear, weights, x, repeats)
        gbytes = n * k * 4 * count / 1e9
        out.append(
            {
                "weight": name,
                "shape": [n, k],
                "count": count,
                "torch_us": 1e6 * t_torch / count,
                "kernel_us": 1e6 * t_kernel / count,
                "torch_gb_s": gbytes / t_torch,
                "kernel_gb_s": gbytes / t_kernel,
                "max_err": err_kernel,
                "torch_max_err": err_torch,
                "max_abs_exact": scale,
                "max_err_vs_torch_err": err_kernel / max(err_torch, 1e-30),
            }
        )
    return out


@torch.no_grad()
def decode_step(work: Workload, rows: int, steps: int) -> dict:
    """Item 2: median ms of one decode step of the whole model, torch vs kernel, alternating."""
    from transformers import DynamicCache, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(work)).eval()
    ids = torch.randint(4, VOCAB, (rows, 128))
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # [rows, 1]
    position = torch.full((rows, 1), ids.shape[1])
    times: dict[bool, list[float]] = {False: [], True: []}
    for step in range(2 * steps):
        fast = step % 2 == 1
        with cpu_decode.fast_decode_linear(fast):
            start = time.perf_counter()
            model(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True)
            times[fast].append(time.perf_counter() - start)
        cache.crop(-1)  # the same step again: every timed step sees 128 cached positions
    return {
        "torch_ms": 1e3 * statistics.median(times[False]),
        "kernel_ms": 1e3 * statistics.median(times[True]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="rows per decode call")
    parser.add_argument("--repeats", type=int, default=9, help="timed passes per weight class")
    parser.add_argument("--steps", type=int, default=15, help="decode steps per side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--json", default=str(RESULTS / "decode_linear.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Workload.from_cli(1, args.threads, args.layers, args.hidden)
    if cpu_decode.extension() is None:
        raise SystemExit("the CPU decode kernel could not be built here (see the warning)")
    classes = per_class(work, args.rows, args.repeats)
    step = decode_step(work, args.rows, args.steps)
    result = {
        "timestamp": utc_timestamp(),
        "git_sha": git_sha(),
        "cpu": cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "rows": args.rows,
        "layers": args.layers,
        "hidden": args.hidden,
        "classes": classes,
        "decode_step": step,
    }
    print(f"{result['cpu']}, {args.threads} threads, {args.rows} rows, torch {torch.__version__}")
    print(f"{'weight':<10} {'shape':>12} {'torch µs':>9} {'kernel µs':>9} {'GB/s':>13} {'err':>5}")
    for c in classes:
        shape = "x".join(map(str, c["shape"]))
        rates = f"{c['torch_gb_s']:.1f} → {c['kernel_gb_s']:.1f}"
        print(
            f"{c['weight']:<10} {shape:>12} {c['torch_us']:9.0f} {c['kernel_us']:9.0f} "
            f"{rates:>13} {c['max_err_vs_torch_err']:5.2f}"
        )
    print(f"decode step: torch {step['torch_ms']:.1f} ms, kernel {step['kernel_ms']:.1f} ms")
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
