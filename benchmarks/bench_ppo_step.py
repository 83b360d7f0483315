"""PPO iteration benchmark: PPOModule vs TRL 1.12 `PPOTrainer` on the fixed workload of issue #5.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_ppo_step --compare-trl
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_ppo_step --profile runs/ppo_profile

Workload (defined once in `benchmarks/trl_ppo_baseline.py` and shared by both sides): a
SmolLM2-135M-shaped policy with separate reference, reward and value models of the same shape,
batch 8, prompts left-padded to 128 tokens, exactly 32 new tokens, 1 PPO epoch over 2 minibatches,
float32, CPU. PPOModule runs under a Lightning `Trainer` exactly as `rlhf fit` runs it (reward
model = an RM export of the random-init classifier, critic initialised from it, reference = frozen
copy of the policy). Reported per iteration (median over the iterations after a warm-up one):
`rollout_s` (generation), `score_s` (reward model), `logprob_s` (old/reference log-probs and
values), `update_s` (PPO epochs), `iteration_s` (wall time of the whole training step) and
tokens/s (response tokens per second of iteration; `gen_tokens_per_s` per second of rollout).

`--compare-trl` first runs `trl_ppo_baseline.py` with the TRL interpreter (`--trl-python`, else
`$RLHF_TRL_PYTHON`, else `.venv-trl/bin/python`; `--setup-trl` creates a missing one: see
`benchmarks/trl_env.py` and benchmarks/TRL.md) in a subprocess, then PPOModule in this process,
and prints both with the ratio ours / TRL (issue #5 target: ≤ 0.5). `--profile DIR` records one
extra iteration with `torch.profiler` (excluded from the medians) as a TensorBoard
trace: `tensorboard --logdir DIR` (needs the `torch-tb-profiler` plugin; the `*.pt.trace.json`
file also opens in Perfetto / chrome://tracing). Rows go to `benchmarks/results/ppo_step.csv`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import trl_env
from benchmarks.results_io import append_csv, git_sha, utc_timestamp
from benchmarks.trl_ppo_baseline import (
    RESULTS,
    Workload,
    build_prompts,
    build_tokenizer,
    left_pad,
    llama_config,
    machine_info,
    model_config,
    summarise,
    warn_if_loaded,
)

ROOT = Path(__file__).resolve().parents[1]
CSV_PATH = RESULTS / "ppo_step.csv"
PHASES = ("iteration_s", "iteration_cpu_s", "rollout_s", "score_s", "logprob_s", "update_s")


def _prompt_batches(work: Workload, tokenizer, n_batches: int) -> list[dict]:
    """`n_batches` PPO prompt batches in the datamodule's format (left-padded to prompt_width)."""
    prompts = build_prompts(work, work.batch_size * n_batches)
    batches = []
    for start in range(0, len(prompts), work.batch_size):
        rows = prompts[start : start + work.batch_size]
        ids, mask = left_pad(rows, work.prompt_width)  # [B, P] each
        texts = [tokenizer.decode(r) for r in rows]
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "prompt_text": texts,
                "prompt_messages": [[{"role": "user", "content": t}] for t in texts],
            }
        )
    return batches


def _reward_export(work: Workload, tokenizer, out_dir: Path) -> Path:
    """A random-init sequence classifier of the workload shape, exported like the RM stage does."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_lightning.models.reward_export import export_reward_model

    torch.manual_seed(work.seed + 1)
    rm = AutoModelForSequenceClassification.from_config(llama_config(work, num_labels=1))
    export_reward_model(rm, tokenizer, out_dir)
    return out_dir


def _build_module(work: Workload, tokenizer, tmp: Path):
    from rlhf_lightning.models.loading import ModelSpec
    from rlhf_lightning.modules.common import OptimConfig
    from rlhf_lightning.modules.ppo import PPOModule
    from rlhf_lightning.ppo.config import (
        CriticConfig,
        GenerationConfig,
        KLConfig,
        MonitorConfig,
        RewardConfig,
        UpdateConfig,
    )

    module = PPOModule(
        model_spec=ModelSpec(config=model_config(work)),
        reward=RewardConfig(
            model=str(_reward_export(work, tokenizer, tmp / "rm")), normalize="none"
        ),
        generation=GenerationConfig(
            max_new_tokens=work.new_tokens,
            min_new_tokens=work.new_tokens,
            temperature=work.temperature,
        ),
        kl=KLConfig(coef=work.kl_coef, estimator="k1"),
        update=UpdateConfig(ppo_epochs=work.ppo_epochs, num_minibatches=work.num_minibatches),
        critic=CriticConfig(kind="reward_model"),
        monitor=MonitorConfig(sample_every=0, histogram_every=0),
        optim=OptimConfig(lr=work.lr),
        export_dir=str(tmp / "export"),
    )
    module.tokenizer = tokenizer
    return module


@contextlib.contextmanager
def _labelled_phases():
    """Wrap the PPO phase functions in `record_function` ranges (for readable traces)."""
    from rlhf_lightning.ppo import advantages, generation, logprobs, scoring, update

    targets = [  # the five steps `PPOModule.training_step` calls through these modules
        (generation, "rollout"),
        (scoring, "score"),
        (logprobs, "logprobs_values"),
        (advantages, "estimate_advantages"),
        (update, "ppo_update"),
    ]
    saved = []
    for mod, name in targets:
        fn = getattr(mod, name, None)
        if fn is None:
            continue

        label = "ppo/" + name.strip("_")

        def wrapped(*args, _fn=fn, _label=label, **kwargs):
            with torch.profiler.record_function(_label):
                return _fn(*args, **kwargs)

        saved.append((mod, name, fn))
        setattr(mod, name, wrapped)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def run_ours(work: Workload, profile_dir: Path | None = None) -> dict:
    """Fit PPOModule for `work.iterations` (+1 profiled) iterations; per-iteration timings."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    tokenizer = build_tokenizer()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ppo_"))
    n_batches = work.iterations + (1 if profile_dir else 0)
    loader = DataLoader(_prompt_batches(work, tokenizer, n_batches), batch_size=None)
    torch.manual_seed(work.seed)
    module = _build_module(work, tokenizer, tmp)
    per_iter: list[dict] = []

    class Clock(pl.Callback):
        prof = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if profile_dir is not None and batch_idx == work.iterations:
                self.prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU],
                    on_trace_ready=torch.profiler.tensorboard_trace_handler(str(profile_dir)),
                    record_shapes=True,
                )
                self.prof.__enter__()
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            total = time.perf_counter() - self.t0
            cpu = time.process_time() - self.cpu0
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                print(f"[ours] profiled iteration written to {profile_dir}", flush=True)
                return
            perf = pl_module.history[-1]
            row = {"iteration_s": total, "iteration_cpu_s": cpu}
            row.update({k: perf[f"ppo/perf/{k}"] for k in PHASES[2:]})
            per_iter.append(row)
            print(f"[ours] iteration {len(per_iter)}: " + _fmt(row), flush=True)

    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Clock()],
        default_root_dir=str(tmp),
    )
    try:
        with _labelled_phases() if profile_dir else contextlib.nullcontext():
            trainer.fit(module, train_dataloaders=loader)
    finally:
        del module, trainer
        gc.collect()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"per_iteration": per_iter, **summarise(per_iter, work)}


def run_trl(work: Workload, python: str, out: Path) -> dict:
    """Run `trl_ppo_baseline.py` in the TRL interpreter `python`; its JSON result."""
    cmd = [
        python,
        str(ROOT / "benchmarks" / "trl_ppo_baseline.py"),
        "--iterations",
        str(work.iterations),
        "--threads",
        str(work.threads),
        "--layers",
        str(work.layers),
        "--hidden",
        str(work.hidden),
        "--out",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    print("[trl] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def _fmt(row: dict) -> str:
    return " ".join(f"{k}={row[k]:.2f}" for k in PHASES if k in row)


# Columns of ppo_step.csv (one row per implementation and run).
CSV_FIELDS = (
    "timestamp_utc",
    "git_sha",
    "impl",
    "version",
    "layers",
    "hidden",
    "batch_size",
    "prompt_width",
    "new_tokens",
    "iterations",
    "timed_iterations",
    *PHASES,
    "tokens_per_s",
    "gen_tokens_per_s",
    "ratio_vs_trl",
    "cpu",
    "cores",
    "threads",
    "loadavg_1m",
    "torch",
    "transformers",
)


def _row(result: dict, work: Workload, impl: str, version: str, ratio) -> dict:
    row = {k: round(result[k], 4) for k in (*PHASES, "tokens_per_s", "gen_tokens_per_s")}
    row.update({k: v for k, v in result["machine"].items()})
    row.update(asdict(work))
    row.update(
        impl=impl,
        version=version,
        ratio_vs_trl=ratio,
        timed_iterations=result["timed_iterations"],
        timestamp_utc=utc_timestamp(),
        git_sha=git_sha(ROOT),
    )
    return row


def print_table(ours: dict, trl: dict | None) -> float | None:
    """Side-by-side medians; returns ours/TRL iteration-time ratio (None without TRL)."""
    print(
        f"\n{'median seconds':<20}{'PPOModule':>12}"
        + (f"{'TRL 1.12':>12}{'ratio':>9}" if trl else "")
    )
    for key in (*PHASES, "tokens_per_s", "gen_tokens_per_s"):
        line = f"{key:<20}{ours[key]:>12.2f}"
        if trl:
            ratio = ours[key] / trl[key] if trl[key] else float("nan")
            line += f"{trl[key]:>12.2f}{ratio:>9.2f}"
        print(line)
    if not trl:
        return None
    ratio = ours["iteration_s"] / trl["iteration_s"]
    verdict = "met" if ratio <= 0.5 else "NOT met"
    print(f"\nours / TRL iteration time = {ratio:.2f} (target ≤ 0.50: {verdict})")
    cpu_ratio = ours["iteration_cpu_s"] / trl["iteration_cpu_s"]
    print(f"ours / TRL iteration CPU time = {cpu_ratio:.2f} (less sensitive to other load)")
    return ratio


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="PPO iterations (1st = warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--profile", type=Path, default=None, help="TensorBoard trace directory")
    parser.add_argument("--compare-trl", action="store_true", help="also run TRL 1.12 (subprocess)")
    trl_env.add_arguments(parser)
    parser.add_argument(
        "--trl-json", type=Path, default=None, help="compare with a saved trl_ppo_baseline result"
    )
    parser.add_argument("--layers", type=int, default=30, help="smaller only for smoke tests")
    parser.add_argument("--hidden", type=int, default=576, help="smaller only for smoke tests")
    parser.add_argument("--no-csv", action="store_true", help="do not append to ppo_step.csv")
    ns = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Workload.from_cli(ns.iterations, ns.threads, ns.layers, ns.hidden)
    torch.set_num_threads(work.threads)
    smoke = ns.layers != 30 or ns.hidden != 576
    warn_if_loaded("iteration times")
    trl = json.loads(ns.trl_json.read_text()) if ns.trl_json else None
    if ns.compare_trl:
        python = trl_env.resolve_trl_python(ns.trl_python, setup=ns.setup_trl)
        trl = run_trl(work, python, RESULTS / ("trl_ppo_smoke.json" if smoke else "trl_ppo.json"))
    machine = machine_info()
    ours = {"impl": "ours", "workload": asdict(work), "machine": machine}
    ours.update(run_ours(work, ns.profile))
    ratio = print_table(ours, trl)
    if not ns.no_csv:
        import rlhf_lightning

        version = getattr(rlhf_lightning, "__version__", "dev")
        rows = [_row(ours, work, "rlhf_lightning", version, round(ratio, 3) if ratio else "")]
        if trl:
            rows.append(_row(trl, work, "trl", trl.get("trl", "1.12.0"), ""))
        append_csv(CSV_PATH, rows, CSV_FIELDS)
        print(f"appended {len(rows)} row(s) to {CSV_PATH}")
    summary = {"ours": ours, "trl": trl, "ratio_iteration_s": ratio}
    name = "ppo_step_smoke.json" if smoke else "ppo_step.json"
    (RESULTS / name).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
