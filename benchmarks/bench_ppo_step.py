"""PPO iteration benchmark: PPOModule vs TRL 1.12 `PPOTrainer` on the fixed workload of issue #5.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_ppo_step --compare-trl
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_ppo_step --profile runs/ppo_profile
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.bench_ppo_step --compare-trl --compare-ppo \
        --advantage grpo --samples-per-prompt 4 --iterations 4          # issue #11 target

Workload (defined once in `benchmarks/trl_ppo_baseline.py` and shared by both sides): a
SmolLM2-135M-shaped policy with separate reference, reward and value models of the same shape,
batch 8, prompts left-padded to 128 tokens, exactly 32 new tokens, 1 PPO epoch over 2 minibatches,
float32, CPU. PPOModule runs under a Lightning `Trainer` exactly as `rlhf fit` runs it (reward
model = an RM export of the random-init classifier, critic initialised from it, reference = frozen
copy of the policy). Reported per iteration (median over the iterations after a warm-up one):
`rollout_s` (generation), `score_s` (reward model), `logprob_s` (old/reference log-probs and
values), `update_s` (PPO epochs), `iteration_s` (wall time of the whole training step) and
tokens/s (response tokens per second of iteration; `gen_tokens_per_s` per second of rollout),
and `peak_rss_mb`, the peak resident set size of the process that ran the side.

Critic-free estimators (issue #11): `--advantage grpo|rloo|reinforce_pp --samples-per-prompt k`
runs our side with `critic.kind: none` on the same 8 rows per iteration: 8 / k prompts × k
samples. Those prompts are the 8 / k longest of the PPO batch of the same iteration, so the
padded query width (after our shared-left-padding trim) and hence every forward's shape equal the
PPO run's. TRL keeps 8 prompts × 1. `--compare-ppo` also runs our PPO (`gae`, k = 1) in a
subprocess and prints ours / our PPO peak RSS (target ≤ 0.7).

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
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import ppo_sides, trl_env
from benchmarks.ppo_sides import PHASES, fmt
from benchmarks.trl_ppo_baseline import (
    RESULTS,
    Workload,
    build_prompts,
    build_tokenizer,
    left_pad,
    llama_config,
    machine_info,
    model_config,
    os_counters,
    os_delta,
    summarise,
    warn_if_loaded,
)

ROOT = Path(__file__).resolve().parents[1]
CSV_PATH = RESULTS / "ppo_step.csv"
ADVANTAGES = ("gae", "grpo", "rloo", "reinforce_pp")
COMPILE_KEYS = ("compile_s", "compiled_graphs")
"""`ppo/perf/*` tags of `compute.compile` (cumulative), reported after the last iteration."""


def _prompt_batches(work: Workload, tokenizer, n_batches: int, samples: int = 1) -> list[dict]:
    """`n_batches` prompt batches in the datamodule's format (left-padded to prompt_width): the
    workload's batches of `batch_size` prompts; with `samples` = k per prompt, the batch_size / k
    longest prompts of each (so the trimmed width, and the B·k rows the rollout makes, match)."""
    prompts = build_prompts(work, work.batch_size * n_batches)
    per_batch = work.batch_size // samples
    batches = []
    for start in range(0, len(prompts), work.batch_size):
        rows = prompts[start : start + work.batch_size]
        longest = sorted(range(len(rows)), key=lambda i: -len(rows[i]))[:per_batch]
        rows = [rows[i] for i in sorted(longest)]  # in workload order; all rows when k = 1
        ids, mask = left_pad(rows, work.prompt_width)  # [B / k, P] each
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


def _build_module(work: Workload, tokenizer, tmp: Path, advantage: str, samples: int, compute):
    from rlhf_lightning.models.loading import ModelSpec
    from rlhf_lightning.modules.common import OptimConfig
    from rlhf_lightning.modules.ppo import PPOModule
    from rlhf_lightning.ppo.config import (
        ComputeConfig,
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
            samples_per_prompt=samples,
        ),
        kl=KLConfig(coef=work.kl_coef, estimator="k1"),
        update=UpdateConfig(
            ppo_epochs=work.ppo_epochs,
            num_minibatches=work.num_minibatches,
            advantage=advantage,
        ),
        critic=CriticConfig(kind="reward_model" if advantage == "gae" else "none"),
        monitor=MonitorConfig(sample_every=0, histogram_every=0),
        compute=ComputeConfig(**compute),
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


def _parameters_in_memory(models) -> dict:
    """Millions of distinct parameters held by the `PPOModels` bundle (policy, reference, critic,
    value head, reward model), and of trainable ones."""
    modules = []
    for value in vars(models).values():
        candidates = [value, *vars(value).values()] if hasattr(value, "__dict__") else [value]
        modules += [m for m in candidates if isinstance(m, torch.nn.Module)]
    params = {id(p): p for m in modules for p in m.parameters()}
    return {
        "parameters_m": sum(p.numel() for p in params.values()) / 1e6,
        "trainable_parameters_m": sum(p.numel() for p in params.values() if p.requires_grad) / 1e6,
    }


def _iteration_clock(base, work: Workload, profile_dir, per_iter: list, held: dict):
    """A Lightning callback (`base` = `pl.Callback`) timing each training step into `per_iter`
    (phases from `ppo/perf/*`) and the parameters in memory into `held`; with `profile_dir`, the
    extra last step is recorded with `torch.profiler` instead."""

    class Clock(base):
        prof = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if profile_dir is not None and batch_idx == work.iterations:
                self.prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU],
                    on_trace_ready=torch.profiler.tensorboard_trace_handler(str(profile_dir)),
                    record_shapes=True,
                )
                self.prof.__enter__()
            self.t0, self.cpu0, self.os0 = time.perf_counter(), time.process_time(), os_counters()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            total = time.perf_counter() - self.t0
            cpu = time.process_time() - self.cpu0
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                print(f"[ours] profiled iteration written to {profile_dir}", flush=True)
                return
            perf = pl_module.history[-1]
            row = {"iteration_s": total, "iteration_cpu_s": cpu, **os_delta(self.os0)}
            row.update({k: perf[f"ppo/perf/{k}"] for k in PHASES[2:]})
            row.update({k: perf[f"ppo/perf/{k}"] for k in COMPILE_KEYS if f"ppo/perf/{k}" in perf})
            per_iter.append(row)
            print(f"[ours] iteration {len(per_iter)}: " + fmt(row), flush=True)
            held.update(_parameters_in_memory(pl_module.models))

    return Clock()


def run_ours(
    work: Workload,
    profile_dir: Path | None = None,
    advantage: str = "gae",
    samples: int = 1,
    compute: dict | None = None,
) -> dict:
    """Fit PPOModule for `work.iterations` (+1 profiled) iterations; per-iteration timings, the
    parameters in memory and this process's peak RSS. `compute`: `ComputeConfig` fields (with
    `compile`, the compile seconds / graph count after the last iteration are reported)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    tokenizer = build_tokenizer()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ppo_"))
    n_batches = work.iterations + (1 if profile_dir else 0)
    batches = _prompt_batches(work, tokenizer, n_batches, samples)
    loader = DataLoader(batches, batch_size=None)
    torch.manual_seed(work.seed)
    module = _build_module(work, tokenizer, tmp, advantage, samples, compute or {})
    held: dict = {}
    per_iter: list[dict] = []
    clock = _iteration_clock(pl.Callback, work, profile_dir, per_iter, held)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        default_root_dir=str(tmp),
    )
    try:
        with _labelled_phases() if profile_dir else contextlib.nullcontext():
            trainer.fit(module, train_dataloaders=loader)
    finally:
        del module, trainer
        gc.collect()
        shutil.rmtree(tmp, ignore_errors=True)
    peak = ppo_sides.self_peak_rss_mb()
    compiled = {k: per_iter[-1][k] for k in COMPILE_KEYS if per_iter and k in per_iter[-1]}
    summary = {**summarise(per_iter, work), **held, **compiled, "peak_rss_mb": peak}
    return {"per_iteration": per_iter, **summary}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="PPO iterations (1st = warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--profile", type=Path, default=None, help="TensorBoard trace directory")
    parser.add_argument("--compare-trl", action="store_true", help="also run TRL 1.12 (subprocess)")
    trl_env.add_arguments(parser)
    parser.add_argument(
        "--trl-json", type=Path, default=None, help="compare with a saved trl_ppo_baseline result"
    )
    parser.add_argument(
        "--advantage", choices=ADVANTAGES, default="gae", help="our update.advantage (gae = PPO)"
    )
    parser.add_argument(
        "--samples-per-prompt", type=int, default=1, help="k; our run has batch_size / k prompts"
    )
    parser.add_argument(
        "--compare-ppo", action="store_true", help="also run our PPO (gae, k=1) in a subprocess"
    )
    parser.add_argument(
        "--compile", action="store_true", help="our side with compute.compile: true (all roles)"
    )
    parser.add_argument(
        "--no-padding-free",
        action="store_true",
        help="our side with compute.padding_free: false (padded forwards, for before/after)",
    )
    parser.add_argument(
        "--no-reuse-critic-forward",
        action="store_true",
        help="our side with compute.reuse_critic_forward: false (for before/after)",
    )
    parser.add_argument(
        "--no-floor", action="store_true", help="skip measuring the GEMM floor in this run"
    )
    parser.add_argument("--layers", type=int, default=30, help="smaller only for smoke tests")
    parser.add_argument("--hidden", type=int, default=576, help="smaller only for smoke tests")
    parser.add_argument("--no-csv", action="store_true", help="do not append to ppo_step.csv")
    parser.add_argument(
        "--out-json", type=Path, default=None, help="summary path (default: benchmarks/results/)"
    )
    return parser.parse_args(argv)


def _check_estimator(work: Workload, advantage: str, samples: int) -> None:
    """One-line errors for an estimator / k that the workload or PPOModule cannot run."""
    from rlhf_lightning.ppo.config import GenerationConfig, UpdateConfig, check_groups

    if samples < 1 or work.batch_size % samples:
        raise SystemExit(
            f"--samples-per-prompt {samples}: must divide the workload's {work.batch_size} rows "
            "per iteration (benchmarks/trl_ppo_baseline.py: Workload.batch_size)"
        )
    try:
        check_groups(
            GenerationConfig(samples_per_prompt=samples), UpdateConfig(advantage=advantage)
        )
    except ValueError as err:
        raise SystemExit(f"--advantage {advantage} --samples-per-prompt {samples}: {err}") from None


def _measure_floor(work: Workload) -> dict:
    """The workload's float32 GEMM floor on this machine, now (after the timed sides, so that the
    rate is taken under the load the iterations saw), with the CPU's bf16 capability."""
    from benchmarks.gemm_floor import cpu_bf16_support, gemm_floor

    print("[floor] measuring the float32 GEMM rate of the workload's shapes", flush=True)
    return {**gemm_floor(work, torch.float32), "cpu_support": cpu_bf16_support()}


def main(argv: list[str] | None = None) -> dict:
    ns = _parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Workload.from_cli(ns.iterations, ns.threads, ns.layers, ns.hidden)
    advantage, samples = ns.advantage, ns.samples_per_prompt
    _check_estimator(work, advantage, samples)
    torch.set_num_threads(work.threads)
    smoke = ns.layers != 30 or ns.hidden != 576
    plain_ppo = advantage == "gae" and samples == 1
    tag = ("" if plain_ppo else f"_{advantage}_k{samples}") + ("_smoke" if smoke else "")
    warn_if_loaded("iteration times")
    sides: dict = {"trl": json.loads(ns.trl_json.read_text()) if ns.trl_json else None}
    with tempfile.TemporaryDirectory(prefix="bench_sides_") as scratch:
        if ns.compare_trl:
            python = trl_env.resolve_trl_python(ns.trl_python, setup=ns.setup_trl)
            # the issue-#5 run keeps its TRL result file; other runs embed TRL's in their summary
            trl_out = RESULTS / ("trl_ppo_smoke.json" if smoke else "trl_ppo.json")
            trl_out = trl_out if plain_ppo else Path(scratch) / "trl.json"
            sides["trl"] = ppo_sides.run_trl(work, python, trl_out)
        if ns.compare_ppo:
            sides["ppo"] = ppo_sides.run_our_ppo(work, Path(scratch) / "ppo.json")
    ours = {"impl": "ours", "workload": asdict(work), "machine": machine_info()}
    ours.update(advantage=advantage, samples_per_prompt=samples, prompts=work.batch_size // samples)
    compute = {
        "compile": ns.compile,
        "padding_free": not ns.no_padding_free,
        "reuse_critic_forward": not ns.no_reuse_critic_forward,
    }
    ours.update(run_ours(work, ns.profile, advantage, samples, compute))
    ours.update(compute)
    sides["ours"] = ours
    floor = None if ns.no_floor else _measure_floor(work)
    label = "PPOModule" if plain_ppo else f"{advantage} k={samples}"
    named = [(label, ours), ("our PPO", sides.get("ppo")), ("TRL 1.12 PPO", sides["trl"])]
    ratios = ppo_sides.print_table([(name, side) for name, side in named if side])
    ratios.update(ppo_sides.print_floor(floor, [(n, side) for n, side in named if side]))
    if not ns.no_csv:
        ppo_sides.write_csv(CSV_PATH, work, sides, ratios, floor)
    summary = {**sides, **ratios, "gemm_floor": floor}
    out = ns.out_json or RESULTS / f"ppo_step{tag}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
