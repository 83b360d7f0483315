"""Token positions one epoch of the reward-model benchmark costs each side: the exact-work ratio.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.reward_positions      # same flags as the bench

`bench_reward_vs_trl` trains both trainers on the same pairs. TRL 1.12's `RewardTrainer` pads each
batch's chosen and rejected rows to the batch's longest row, [2B, T_max]; our `RewardModule` packs
each pair as its shared prompt once plus both responses, with no padding. Every linear layer costs
the same per token position on both sides, so positions(TRL) / positions(ours) is the speed-up at
equal per-position cost — what issue #13's "≥ 2.5× TRL pairs/s" has to beat. TRL's batches are
drawn by its own shuffled sampler, so its count is given for the file order and as the median and
range over `--shuffles` random orders.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks import bench_reward_vs_trl as bench
from rlhf_lightning.modules.reward_packing import shared_prefix_lengths


def packed_positions(pairs: list[tuple[int, int, int]]) -> int:
    """Our positions for `pairs` of (chosen length, rejected length, shared prefix)."""
    return sum(c + r - s for c, r, s in pairs)


def padded_positions(pairs: list[tuple[int, int, int]], order: list[int], batch: int) -> int:
    """TRL's positions: each batch of `order` as 2·b rows padded to its longest row."""
    total = 0
    for start in range(0, len(order), batch):
        chunk = [pairs[i] for i in order[start : start + batch]]
        total += 2 * len(chunk) * max(max(c, r) for c, r, _ in chunk)
    return total


def pair_lengths(dm) -> list[tuple[int, int, int]]:
    """(chosen length, rejected length, shared prefix) of every training pair, the shared prefix
    as our packing computes it (`reward_packing.shared_prefix_lengths`)."""
    pairs = []
    for batch in dm.dataloader("preference", split="train", shuffle=False):
        ids, mask = batch["input_ids"], batch["attention_mask"]  # [2G, T] rows 2g, 2g + 1
        groups = int(batch["num_groups"])
        shared = shared_prefix_lengths(ids, mask, batch["group"], groups)  # [G]
        lengths = mask.sum(-1)  # [2G]
        for g in range(groups):
            pairs.append((int(lengths[2 * g]), int(lengths[2 * g + 1]), int(shared[g])))
    return pairs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=bench.HH)
    ap.add_argument("--model", default=None, help="local save_pretrained dir (default: GGUF)")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--val-pairs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shuffles", type=int, default=200)
    ns = ap.parse_args(argv)
    if not ns.data.exists():
        raise SystemExit(f"--data: {ns.data} not found")
    work = Path(tempfile.mkdtemp(prefix="reward_positions_"))
    try:
        model_dir = bench.materialise_model(ns, work)
        dm = bench.build_datamodule(ns, model_dir, *bench.split_raw(ns, work))
        pairs = pair_lengths(dm)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours = packed_positions(pairs)
    rng = random.Random(ns.seed)
    orders = [rng.sample(range(len(pairs)), len(pairs)) for _ in range(ns.shuffles)]
    shuffled = [padded_positions(pairs, order, ns.batch_size) / ours for order in orders]
    file_order = padded_positions(pairs, list(range(len(pairs))), ns.batch_size)
    result = {
        "pairs": len(pairs),
        "ours_positions": ours,
        "rows_real_tokens": sum(c + r for c, r, _ in pairs),
        "trl_positions_file_order": file_order,
        "ratio_file_order": round(file_order / ours, 3),
        "ratio_median": round(statistics.median(shuffled), 3),
        "ratio_range": [round(min(shuffled), 3), round(max(shuffled), 3)],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
