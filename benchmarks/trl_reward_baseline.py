"""TRL `RewardTrainer` baseline for the reward-model throughput comparison of issue #4.

Run it with the separate TRL interpreter (see benchmarks/TRL.md):

    HF_HUB_OFFLINE=1 .venv-trl/bin/python benchmarks/trl_reward_baseline.py \\
        --train pairs_train.jsonl --val pairs_val.jsonl --model MODEL_DIR \\
        --batch-size 8 --max-length 512 --steps 20 --out benchmarks/results/trl_reward.json

Data: JSON lines (`.gz` allowed), either pre-tokenized `{"chosen_ids": [...], "rejected_ids":
[...]}` rows — what `bench_reward_vs_trl.py` writes from our datamodule so that both trainers see
the very same token rows — or text rows that TRL tokenizes itself (`chosen`/`rejected`, optional
`prompt`; Anthropic HH transcripts work as they are). TRL drops pairs longer than `--max-length`.

Model: `--model DIR`, a local `save_pretrained` directory (causal LM or sequence classifier, with
its tokenizer), loaded as `AutoModelForSequenceClassification(num_labels=1)`; or `--config
FILE.json` (a Llama config dict) with `--tokenizer DIR` for a random-init model. When the
tokenizer has no pad token, or pad == eos, a dedicated pad token is added (and the embeddings
resized): transformers' classifier reads the score before the first pad id, so pad == eos would
score chat transcripts at their first end-of-turn token. Matching our trainer's defaults,
gradient checkpointing and bf16 are off (TRL's `RewardConfig` turns both on by default).

Reported (JSON and stdout): pairs/s over the training steps after `--warmup-steps` (pairs in
those steps / their summed wall time, from `on_step_begin`/`on_step_end` callbacks), the whole
`train()` wall time, and the held-out accuracy — the fraction of validation pairs with
r_chosen > r_rejected (ties count as wrong), computed exactly over all pairs after training.
Reference: TRL 1.12 `trl/trainer/reward_trainer.py`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """Rows of a JSON-lines file (gzip by suffix); one-line error naming file:line."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SystemExit(f"{path}:{number}: invalid JSON ({err.msg})") from err
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _ensure_pad(model, tokenizer) -> bool:
    """Give the tokenizer its own pad token when it has none or pad == eos; True if added."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        model.config.pad_token_id = tokenizer.pad_token_id
        return False
    tokenizer.add_special_tokens({"pad_token": "<|trl_pad|>"})
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    return True


def load_model(ns):
    """(model, tokenizer, pad_added) from `--model` or `--config` + `--tokenizer`."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(ns.seed)
    if ns.model:
        model = AutoModelForSequenceClassification.from_pretrained(
            ns.model, num_labels=1, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(ns.tokenizer or ns.model)
    else:
        cfg = json.loads(Path(ns.config).read_text())
        config = AutoConfig.for_model(**cfg, num_labels=1)
        model = AutoModelForSequenceClassification.from_config(config)
        tokenizer = AutoTokenizer.from_pretrained(ns.tokenizer)
    return model, tokenizer, _ensure_pad(model, tokenizer)


@torch.no_grad()
def held_out_accuracy(model, dataset, pad_id: int, batch_size: int) -> dict:
    """Exact pairwise accuracy and mean margin over a tokenized (`chosen_ids`) dataset."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    collate = DataCollatorForPreference(pad_token_id=pad_id)
    was_training = model.training
    model.eval()
    diffs = []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate(rows)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits.squeeze(-1)  # [2b]
        chosen, rejected = logits.chunk(2)  # [b] each
        diffs.append(chosen - rejected)
    model.train(was_training)
    diff = torch.cat(diffs)  # [N]
    return {
        "accuracy": float((diff > 0).float().mean()),
        "margin": float(diff.mean()),
        "pairs": int(diff.numel()),
    }


def reward_config(ns, out_dir: str):
    """TRL's `RewardConfig` of the flags: float32 on CPU, cosine schedule, no eval or saving."""
    from trl import RewardConfig

    return RewardConfig(
        output_dir=out_dir,
        per_device_train_batch_size=ns.batch_size,
        per_device_eval_batch_size=ns.batch_size,
        max_steps=ns.steps,
        learning_rate=ns.lr,
        weight_decay=ns.weight_decay,
        warmup_steps=ns.warmup_lr_steps,
        lr_scheduler_type="cosine",
        max_length=ns.max_length,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=max(1, ns.steps),
        disable_tqdm=True,
        use_cpu=True,
        seed=ns.seed,
        dataloader_num_workers=0,
    )


def step_clock_callback(steps: list[float], cpu: list[float]):
    """A trainer callback appending each optimizer step's wall and CPU seconds."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_a, **_k):
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *_a, **_k):
            steps.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.cpu0)

    return StepClock()


def throughput(ns, steps: list[float], cpu: list[float]) -> dict:
    """Pairs per wall and per CPU second over the steps after `--warmup-steps`."""
    timed = steps[ns.warmup_steps :] or steps
    timed_cpu = cpu[ns.warmup_steps :] or cpu
    return {
        "pairs_per_s": ns.batch_size * len(timed) / sum(timed),
        "pairs_per_cpu_s": ns.batch_size * len(timed_cpu) / sum(timed_cpu),
        "timed_steps": len(timed),
    }


def run(ns) -> dict:
    """Train TRL's RewardTrainer per the flags; throughput, dropped pairs, held-out accuracy."""
    from datasets import Dataset
    from trl import RewardTrainer

    model, tokenizer, pad_added = load_model(ns)
    train_rows = read_jsonl(Path(ns.train), ns.limit)
    val_rows = read_jsonl(Path(ns.val), ns.val_limit) if ns.val else []
    out_dir = tempfile.mkdtemp(prefix="trl_reward_")
    train = Dataset.from_list(train_rows)
    val = Dataset.from_list(val_rows) if val_rows else None
    trainer = RewardTrainer(
        model=model,
        args=reward_config(ns, out_dir),
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
    )
    steps: list[float] = []
    cpu: list[float] = []
    trainer.add_callback(step_clock_callback(steps, cpu))
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    rates = throughput(ns, steps, cpu)
    result = {
        "impl": "trl",
        "pairs_per_s": rates["pairs_per_s"],
        "pairs_per_cpu_s": rates["pairs_per_cpu_s"],
        "train_s": train_s,
        "steps": len(steps),
        "timed_steps": rates["timed_steps"],
        "step_s": steps,
        "train_pairs": len(trainer.train_dataset),
        "dropped_train_pairs": len(train_rows) - len(trainer.train_dataset),
        "pad_added": pad_added,
    }
    if val is not None:
        val_ds = trainer.eval_dataset
        result["val"] = held_out_accuracy(
            trainer.model, val_ds, tokenizer.pad_token_id, ns.batch_size
        )
        result["dropped_val_pairs"] = len(val_rows) - len(val_ds)
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True, help="training pairs (JSONL, .gz ok)")
    p.add_argument("--val", default=None, help="held-out pairs (JSONL, .gz ok)")
    p.add_argument("--model", default=None, help="local save_pretrained dir (with tokenizer)")
    p.add_argument("--config", default=None, help="JSON config dict for a random-init model")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --model)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=512, help="max tokens per response row")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps left out of pairs/s")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup-lr-steps", type=int, default=0, help="linear LR warm-up steps")
    p.add_argument("--limit", type=int, default=None, help="use the first N training rows")
    p.add_argument("--val-limit", type=int, default=None, help="use the first N held-out rows")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0, help="seed (head init, data order)")
    p.add_argument("--out", type=Path, default=RESULTS / "trl_reward.json", help="JSON output")
    ns = p.parse_args(argv)
    if (ns.model is None) == (ns.config is None):
        p.error("give exactly one of --model and --config")
    if ns.config and not ns.tokenizer:
        p.error("--config needs --tokenizer")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(ns.threads)
    import transformers
    import trl

    result = run(ns)
    result.update(
        settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(ns).items()},
        versions={
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        threads=torch.get_num_threads(),
        loadavg_1m=os.getloadavg()[0],
    )
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=2) + "\n")
    brief = {k: v for k, v in result.items() if k not in ("step_s", "settings")}
    print(json.dumps(brief, indent=2))
    return result


if __name__ == "__main__":
    main()
