"""oneDNN float32 linear layers (`rlhf_lightning.kernels.onednn_linear`) against torch's (MKL) on
the PPO workload's model (issue #13).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_onednn_linear
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_onednn_linear   # AVX2 code only

Two measurements:

1. Per weight class (q/o, k/v, gate/up, down, the LM head) and row count (`--rows`: the update's
   minibatch of 4 × 157 tokens, the no-grad forwards' 8 × 160, the LM head's 4 × 32 response
   positions), the three GEMMs of a linear layer — y = x Wᵀ, dx = dy W, dW = dyᵀ x — with torch
   and with oneDNN (dW: oneDNN's linear of dyᵀ and xᵀ, for the record; `onednn_linear` keeps it
   on torch): GFLOP/s (median call), and the relative RMS error against float64 of each side.
2. The whole model: forward + backward of the policy (LM head at the last 32 positions) and the
   critic on `--rows-model` × 157 tokens, and no-grad forwards, with `torch.nn.functional.linear`
   and inside `onednn_linears()`, alternating so that drift hits both: median seconds.

Prints a table and writes `results/onednn_linear.json` (CPU model, threads, torch version, git
sha, the instruction-set limits in the environment).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from rlhf_lightning.kernels.onednn_linear import onednn_linears

from benchmarks.results_io import git_sha, utc_timestamp
from benchmarks.trl_ppo_baseline import RESULTS, VOCAB, Workload, cpu_model, llama_config


def _LP(*args):
    return torch.ops.mkldnn._linear_pointwise(*args)


def weight_classes(work: Workload) -> dict[str, tuple[int, int]]:
    """name → (out features N, in features K) of the model's distinct linear shapes."""
    kv = work.kv_heads * (work.hidden // work.heads)
    return {
        "q/o_proj": (work.hidden, work.hidden),
        "k/v_proj": (kv, work.hidden),
        "gate/up_proj": (work.intermediate, work.hidden),
        "down_proj": (work.hidden, work.intermediate),
        "lm_head": (VOCAB, work.hidden),
    }


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rel_rms(value: torch.Tensor, exact: torch.Tensor) -> float:
    return float((value.double() - exact).norm() / exact.norm())


def _gemms(x, w, dy) -> dict[str, tuple]:
    """name → (torch call, oneDNN call, float64 result) for the three GEMMs of one layer."""
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    xt, dyt = x.t().contiguous(), dy.t().contiguous()
    return {
        "y": (lambda: x.mm(w.t()), lambda: _LP(x, w, None, "none", [], ""), x64 @ w64.t()),
        "dx": (lambda: dy.mm(w), lambda: _LP(dy, w.t(), None, "none", [], ""), dy64 @ w64),
        "dW": (lambda: dy.t().mm(x), lambda: _LP(dyt, xt, None, "none", [], ""), dy64.t() @ x64),
    }


def per_class(work: Workload, rows: list[int], repeats: int) -> list[dict]:
    """Item 1: GFLOP/s and error of each GEMM of each weight class, torch vs oneDNN."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in weight_classes(work).items():
        for m in rows if name != "lm_head" else [rows[-1]]:
            x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) / k**0.5
            dy = torch.randn(m, n, generator=gen)
            for gemm, (torch_fn, dnn_fn, exact) in _gemms(x, w, dy).items():
                flops = 2 * m * n * k / 1e9
                out.append(
                    {
                        "weight": name,
                        "gemm": gemm,
                        "shape": [m, k, n],
                        "torch_gflops": flops / _median_s(torch_fn, repeats),
                        "onednn_gflops": flops / _median_s(dnn_fn, repeats),
                        "torch_rel_rms": _rel_rms(torch_fn(), exact),
                        "onednn_rel_rms": _rel_rms(dnn_fn(), exact),
                    }
                )
    return out


def whole_model(work: Workload, rows: int, pairs: int) -> dict:
    """Item 2: median seconds of policy + critic forward + backward and of the no-grad forwards,
    torch vs oneDNN, alternating."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(llama_config(work))
    critic = AutoModelForSequenceClassification.from_config(llama_config(work, num_labels=1))
    ids = torch.randint(4, VOCAB, (rows, 157))

    def step(grad: bool) -> None:
        with torch.set_grad_enabled(grad):
            hidden = policy.model(input_ids=ids).last_hidden_state
            logits = policy.lm_head(hidden[:, -32:])  # [rows, 32, V]
            values = critic.score(critic.model(input_ids=ids).last_hidden_state)
            if grad:
                (logits.logsumexp(-1).mean() + values.mean()).backward()
        policy.zero_grad(set_to_none=True)
        critic.zero_grad(set_to_none=True)

    times = {(grad, dnn): [] for grad in (True, False) for dnn in (False, True)}
    for i in range(2 * pairs + 2):  # the first pair warms both sides up
        dnn = i % 2 == 1
        for grad in (True, False):
            with onednn_linears(dnn):
                start = time.perf_counter()
                step(grad)
                if i >= 2:
                    times[grad, dnn].append(time.perf_counter() - start)
    return {
        "rows": rows,
        "train_torch_s": statistics.median(times[True, False]),
        "train_onednn_s": statistics.median(times[True, True]),
        "nograd_torch_s": statistics.median(times[False, False]),
        "nograd_onednn_s": statistics.median(times[False, True]),
    }


def _print(result: dict) -> None:
    print(f"{result['cpu']}, {result['threads']} threads, torch {result['torch']} {result['isa']}")
    print(f"{'weight':<13} {'gemm':<4} {'m×k×n':>15} {'GFLOP/s torch → oneDNN':>24} {'err ×':>6}")
    for c in result["classes"]:
        shape = "×".join(map(str, c["shape"]))
        rates = f"{c['torch_gflops']:.0f} → {c['onednn_gflops']:.0f}"
        ratio = c["onednn_rel_rms"] / max(c["torch_rel_rms"], 1e-30)
        print(f"{c['weight']:<13} {c['gemm']:<4} {shape:>15} {rates:>24} {ratio:6.2f}")
    m = result["model"]
    print(
        f"model ({m['rows']} rows): forward + backward {m['train_torch_s']:.2f} → "
        f"{m['train_onednn_s']:.2f} s, no-grad forwards {m['nograd_torch_s']:.2f} → "
        f"{m['nograd_onednn_s']:.2f} s"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[628, 1280, 128])
    parser.add_argument("--rows-model", type=int, default=4, help="sequences in item 2")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per GEMM")
    parser.add_argument("--pairs", type=int, default=4, help="torch/oneDNN pairs in item 2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--json", default=str(RESULTS / "onednn_linear.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Workload.from_cli(1, args.threads, args.layers, args.hidden)
    limits = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
    result = {
        "timestamp": utc_timestamp(),
        "git_sha": git_sha(),
        "cpu": cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "isa": {k: os.environ[k] for k in limits if k in os.environ},
        "layers": args.layers,
        "hidden": args.hidden,
        "classes": per_class(work, args.rows, args.repeats),
        "model": whole_model(work, args.rows_model, args.pairs),
    }
    _print(result)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
