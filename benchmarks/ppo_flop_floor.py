"""Lower bound on a PPO iteration's CPU time for the issue #5 workload: FLOPs ÷ peak GEMM rate.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ppo_flop_floor

Any exact PPO implementation (π_old taken from the sampler, as TRL and our default do) must run:
generation (prefill + 31 cached decode steps), one reward-model forward, one reference forward,
the critic forward of the rows outside the first minibatch (the first minibatch's is the one the
update trains on: before the first optimizer step it is the same computation — our
`compute.reuse_critic_forward`), and per minibatch one policy and one critic forward + backward.
This script
counts the matrix-multiply FLOPs of exactly those passes on the workload's shapes with
`torch.utils.flop_counter.FlopCounterMode` (attention, norms, softmax and the optimizer are NOT
counted, so the bound is loose on the low side), twice: with the workload's left padding, and
scaled to the real (unpadded) tokens — what a perfect padding-free implementation would run.
It then measures the best float32 `torch.mm` rate on the model's GEMM shapes (separately for the
decode steps, whose GEMMs have only batch_size rows) and prints floor = Σ FLOPs / rate next to TRL's measured iteration time (`results/trl_ppo.json`) and the
issue's target (0.5 × TRL). Writes `results/ppo_flop_floor.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.trl_ppo_baseline import (
    RESULTS,
    VOCAB,
    Workload,
    build_prompts,
    left_pad,
    llama_config,
)


def _models(work: Workload):
    from transformers import LlamaForCausalLM, LlamaModel

    config = llama_config(work)
    torch.manual_seed(work.seed)
    return LlamaForCausalLM(config).eval(), LlamaModel(config).eval()


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count_flops(work: Workload) -> dict[str, int]:
    """Matmul FLOPs of each pass a PPO iteration needs (whole rollout batch)."""
    policy, trunk = _models(work)
    ids, mask = left_pad(build_prompts(work, work.batch_size), work.prompt_width)  # [B, P]
    steps = work.new_tokens
    full_ids = torch.cat([ids, torch.randint(4, 1000, (len(ids), steps))], 1)  # [B, P + R]
    full_mask = torch.cat([mask, torch.ones(len(ids), steps, dtype=mask.dtype)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)

    def lm_forward():
        return policy(
            input_ids=full_ids,
            attention_mask=full_mask,
            position_ids=pos,
            logits_to_keep=steps + 1,
            use_cache=False,
        ).logits

    def trunk_forward():
        return trunk(
            input_ids=full_ids, attention_mask=full_mask, position_ids=pos
        ).last_hidden_state

    flops = {}
    with torch.no_grad():
        flops["prefill"] = _count(
            lambda: policy(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        )
        flops["decode"] = (
            _count(
                lambda: policy.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    max_new_tokens=steps,
                    min_new_tokens=steps,
                    pad_token_id=0,
                )
            )
            - flops["prefill"]
        )
        flops["reference_forward"] = _count(lm_forward)
        flops["reward_forward"] = _count(trunk_forward)
        # step 3 needs the critic only on the rows the update's first minibatch does not cover
        flops["critic_forward"] = round(flops["reward_forward"] * (1 - 1 / work.num_minibatches))
    flops["policy_forward_backward"] = _count(lambda: lm_forward().sum().backward())
    flops["critic_forward_backward"] = _count(lambda: trunk_forward().sum().backward())
    real = int(mask.sum()) + len(ids) * steps
    flops["padding_free_fraction"] = real / full_mask.numel()
    return flops


def best_gemm_rate(
    shapes: list[tuple[int, int, int]],
    repeats: int = 7,
    dtype: torch.dtype = torch.float32,
    library: str = "torch",
) -> float:
    """Best GFLOP/s in `dtype` (fastest single call) over `shapes` (m, k, n): `torch.mm` of
    [m, k] · [k, n] (library "torch": MKL on x86 CPUs), or oneDNN's linear of [m, k] and an
    [n, k] weight (library "onednn": `torch.ops.mkldnn._linear_pointwise`, what
    `rlhf_lightning.kernels.onednn_linear` runs)."""
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k).to(dtype)
        if library == "onednn":
            w = torch.randn(n, k).to(dtype)

            def call(a=a, w=w):
                return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
        else:
            b = torch.randn(k, n).to(dtype)

            def call(a=a, b=b):
                return torch.mm(a, b)

        call()
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best


def gemm_shapes(work: Workload, tokens: int) -> list[tuple[int, int, int]]:
    """The model's projection / MLP / LM-head GEMMs for `tokens` rows."""
    return [
        (tokens, work.hidden, work.intermediate),
        (tokens, work.intermediate, work.hidden),
        (tokens, work.hidden, work.hidden),
        (tokens, work.hidden, VOCAB),
    ]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trl-json", type=Path, default=RESULTS / "trl_ppo.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "ppo_flop_floor.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Workload(threads=args.threads)
    flops = count_flops(work)
    fraction = flops.pop("padding_free_fraction")
    per_minibatch = ("policy_forward_backward", "critic_forward_backward")
    # the update passes cover the whole batch once per epoch (split over the minibatches)
    epochs_extra = sum(flops[k] for k in per_minibatch) * (work.ppo_epochs - 1)
    dense = sum(v for k, v in flops.items() if k != "decode") + epochs_extra
    rate = best_gemm_rate(gemm_shapes(work, work.batch_size * work.prompt_width) + [(2048,) * 3])
    # decode steps multiply batch_size rows: memory-bound GEMMs with their own (lower) best rate
    decode_rate = best_gemm_rate(gemm_shapes(work, work.batch_size))
    decode_s = flops["decode"] / decode_rate / 1e9
    result = {
        "tflops_per_pass": {k: round(v / 1e12, 4) for k, v in flops.items()},
        "tflops_total_padded": round((dense + flops["decode"]) / 1e12, 4),
        "padding_free_fraction": round(fraction, 4),
        "peak_fp32_gemm_gflops": round(rate, 1),
        "decode_fp32_gemm_gflops": round(decode_rate, 1),
        "floor_s_padded": round(dense / rate / 1e9 + decode_s, 2),
        "floor_s_padding_free": round(dense * fraction / rate / 1e9 + decode_s, 2),
    }
    if args.trl_json.exists():
        trl = json.loads(args.trl_json.read_text())["iteration_s"]
        result["trl_iteration_s"] = round(trl, 2)
        result["target_s"] = round(0.5 * trl, 2)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
