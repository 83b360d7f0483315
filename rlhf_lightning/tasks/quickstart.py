"""Quickstart pipeline runner: the embedded task end to end, offline, on CPU.

`make quickstart` runs `python -m rlhf_lightning.tasks.quickstart --out runs/quickstart`:
each stage of `STAGES` runs in order, is timed, and a short table is printed at the end.
Stages run in-process (the `rlhf` CLI through `cli.run_cli`), with the config files of
`configs/quickstart/` and every path redirected under `--out`. A stage is a name plus a
function `(ctx) -> dict` of headline numbers; later stages are appended to `STAGES`.

Tiny models are dominated by per-op overhead, so the runner defaults to one intra-op
thread (`--threads`): on a shared 2-core machine two spinning OpenMP threads were
measured 10× slower per step than one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Context:
    """What the stages share: the output folder, config folder, and results so far."""

    out: Path
    configs: Path
    seed: int = 0
    results: dict[str, dict] = field(default_factory=dict)
    assets: object = None
    overrides: list[str] = field(default_factory=list)
    """Extra CLI overrides: `KEY=VALUE` for every fit stage (e.g. `trainer.max_steps=10`),
    `STAGE:KEY=VALUE` for one stage only (e.g. `label:limit=32`, `sft:trainer.max_steps=4`)."""

    def stage_overrides(self, stage: str, *, unscoped: bool = True) -> list[str]:
        """`--KEY=VALUE` arguments for `stage`: its scoped overrides (+ the unscoped ones)."""
        found = []
        for item in self.overrides:
            key = item.partition("=")[0]
            scope, colon, _ = key.partition(":")
            if colon and scope == stage:
                found.append("--" + item[len(scope) + 1 :])
            elif not colon and unscoped:
                found.append("--" + item)
        return found

    def config(self, name: str) -> Path:
        path = self.configs / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: quickstart config not found (see --configs)")
        return path


@dataclass
class Stage:
    """One pipeline step: `run(ctx)` returns headline numbers for the summary table."""

    name: str
    run: Callable[[Context], dict]
    description: str = ""


def fit_stage(ctx: Context, configs: list[str], version: str, overrides: dict[str, str]) -> dict:
    """`rlhf fit --config <c1> [--config <c2> ...] <overrides>` in-process; the final metrics.

    Later config files override earlier ones (an overlay such as `ppo_overopt.yaml` is given
    after its base `ppo.yaml`). The stage's TensorBoard run folder `<out>/tb/<version>` is
    cleared first, so a rerun does not mix its events with an earlier run's.
    """
    from rlhf_lightning.cli import run_cli

    shutil.rmtree(ctx.out / "tb" / version, ignore_errors=True)
    argv = ["fit"]
    for name in configs:
        argv += ["--config", str(ctx.config(name))]
    argv += [
        f"--trainer.default_root_dir={ctx.out}",
        f"--trainer.logger.init_args.save_dir={ctx.out}",
        f"--trainer.logger.init_args.version={version}",
    ]
    argv += [f"--{key}={value}" for key, value in overrides.items()]
    argv += ctx.stage_overrides(version)
    cli = run_cli(argv)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    metrics["global_step"] = cli.trainer.global_step
    metrics["log_dir"] = cli.trainer.log_dir
    return metrics


def prepare_stage(ctx: Context) -> dict:
    """Generate the sentiment task's data and tokenizer under `<out>`."""
    from rlhf_lightning.tasks.sentiment import prepare

    ctx.assets = prepare(ctx.out, seed=ctx.seed)
    lines = sum(1 for _ in ctx.assets.sft_train.open())
    return {"train_demonstrations": lines}


def sft_stage(ctx: Context) -> dict:
    """Supervised fine-tuning of the tiny Llama (configs/quickstart/sft.yaml)."""
    out = ctx.out
    metrics = fit_stage(
        ctx,
        ["sft.yaml"],
        "sft",
        {
            "seed_everything": str(ctx.seed),
            "model.init_args.export_dir": str(out / "export" / "sft"),
            "data.tokenizer": str(out / "tokenizer"),
            "data.demonstrations.path": str(out / "data" / "sft_train.jsonl"),
            "data.demonstrations.val_path": str(out / "data" / "sft_val.jsonl"),
        },
    )
    return {
        k: metrics[k]
        for k in ("sft/train/loss", "sft/val/loss", "sft/val/ppl", "global_step", "log_dir")
        if k in metrics
    }


def label_stage(ctx: Context) -> dict:
    """`rlhf label`: K samples per prompt from the SFT policy, ranked by the simulated human."""
    from rlhf_lightning.labeling import main as label_main

    out = ctx.out
    summary = label_main(
        [
            "--config", str(ctx.config("label.yaml")),
            f"--policy.name_or_path={out / 'export' / 'sft'}",
            f"--prompts.path={out / 'data' / 'prompts.jsonl'}",
            f"--out={out / 'data' / 'rankings.jsonl'}",
            f"--seed={ctx.seed}",
            *ctx.stage_overrides("label", unscoped=False),
        ]
    )  # fmt: skip
    return {k: summary[k] for k in ("prompts", "written", "all_tied") if k in summary}


def reward_stage(ctx: Context) -> dict:
    """Reward model on the collected rankings (K-wise loss), initialised from the SFT export."""
    out = ctx.out
    sft = str(out / "export" / "sft")
    metrics = fit_stage(
        ctx,
        ["reward.yaml"],
        "reward",
        {
            "seed_everything": str(ctx.seed),
            "model.init_args.model_spec.name_or_path": sft,
            "model.init_args.export_dir": str(out / "export" / "reward"),
            "data.tokenizer": sft,
            "data.preferences.path": str(out / "data" / "rankings.jsonl"),
        },
    )
    keys = ("reward/train/loss", "reward/val/loss", "reward/val/accuracy", "global_step")
    return {k: metrics[k] for k in keys if k in metrics}


def _ppo_overrides(ctx: Context, export_name: str) -> dict[str, str]:
    out = ctx.out
    return {
        "seed_everything": str(ctx.seed),
        "model.init_args.model_spec.name_or_path": str(out / "export" / "sft"),
        "model.init_args.reward.model": str(out / "export" / "reward"),
        "model.init_args.export_dir": str(out / "export" / export_name),
        "data.tokenizer": str(out / "export" / "sft"),
        "data.prompts.path": str(out / "data" / "prompts.jsonl"),
    }


def _ppo_result(metrics: dict) -> dict:
    keys = ("ppo/objective/reward_raw", "ppo/objective/gold", "ppo/objective/kl", "global_step")
    return {k: metrics[k] for k in keys if k in metrics}


def ppo_stage(ctx: Context) -> dict:
    """PPO against the reward model with the KL leash to the SFT policy."""
    return _ppo_result(fit_stage(ctx, ["ppo.yaml"], "ppo", _ppo_overrides(ctx, "ppo")))


def overopt_stage(ctx: Context) -> dict:
    """The over-optimisation demo: no KL penalty, longer training; watch the monitor's warnings.

    `ppo_overopt.yaml` is an overlay: it is given after `ppo.yaml` and changes only a few values.
    """
    configs = ["ppo.yaml", "ppo_overopt.yaml"]
    metrics = fit_stage(ctx, configs, "ppo_overopt", _ppo_overrides(ctx, "ppo_overopt"))
    result = _ppo_result(metrics)
    result.update(_evaluate(ctx, "ppo_overopt"))
    return result


def compare_stage(ctx: Context) -> dict:
    """PPO, GRPO, RLOO and REINFORCE++ at an equal budget, each in its own process; one table
    `<out>/compare/estimators.md` (held-out gold and KL, wall time, peak RSS, models in memory).
    See `rlhf_lightning.tasks.compare_estimators` and docs/critic_free.md."""
    from rlhf_lightning.tasks.compare_estimators import compare

    return compare(ctx)


def _evaluate(ctx: Context, export_name: str) -> dict:
    """Held-out numbers of one export against the SFT policy (`rlhf evaluate`, no best-of-N)."""
    policies = [_export_policy(ctx, "sft"), _export_policy(ctx, export_name)]
    report = _run_evaluate(ctx, policies, f"evaluate_{export_name}")
    row = _policy_row(report, export_name)
    keys = {"gold": "gold", "distinct_2": "distinct_2", "kl_held_out": "kl", "win_rate": "win_rate"}
    return {name: row[key] for name, key in keys.items()}


def evaluate_stage(ctx: Context) -> dict:
    """`rlhf evaluate` with configs/quickstart/evaluate.yaml: the SFT and PPO policies and best-of-N
    of the SFT policy under the proxy RM, on the same held-out prompts with the same sampling,
    judged by the simulated human; whether PPO beats best-of-N at equal KL."""
    import yaml

    config = yaml.safe_load(ctx.config("evaluate.yaml").read_text())
    report = _run_evaluate(ctx, [_redirected(ctx, p) for p in config["policies"]], "evaluate")
    sft, ppo = _policy_row(report, "sft"), _policy_row(report, "ppo")
    top = max((r for r in report["policies"] if r["n"] is not None), key=lambda r: r["n"])
    versus = next(c for c in report["comparisons"] if c["policy"] == "ppo")
    return {
        "gold_sft": sft["gold"],
        "gold_ppo": ppo["gold"],
        "kl_ppo": ppo["kl"],
        "win_rate_ppo": ppo["win_rate"],
        "distinct_2_sft": sft["distinct_2"],
        "distinct_2_ppo": ppo["distinct_2"],
        "best_of_n_max": top["n"],
        "gold_best_of_n": top["gold"],
        "kl_best_of_n": top["kl"],
        "ppo_minus_best_of_n": versus["gold_minus_bon"],
        "ppo_vs_best_of_n": versus["verdict"],
    }


def _run_evaluate(ctx: Context, policies: list[dict], out_name: str) -> dict:
    """`rlhf evaluate --config evaluate.yaml` in-process on `policies`, report in `<out>/<out_name>`.

    Held-out prompts: `<out>/data/sft_val.jsonl` (never used by label or PPO); proxy: the reward
    export; `evaluate:KEY=VALUE` overrides apply (e.g. `evaluate:prompts.limit=16`).
    """
    from rlhf_lightning.evaluation.run import main as evaluate_main

    out = ctx.out
    return evaluate_main(
        [
            "--config", str(ctx.config("evaluate.yaml")),
            f"--policies={json.dumps(policies)}",
            f"--prompts.path={out / 'data' / 'sft_val.jsonl'}",
            f"--proxy.reward_model={out / 'export' / 'reward'}",
            f"--out_dir={out / out_name}",
            f"--sampling.seed={ctx.seed}",
            *ctx.stage_overrides("evaluate", unscoped=False),
        ]
    )  # fmt: skip


def _export_policy(ctx: Context, name: str) -> dict:
    return {"name": name, "model": {"name_or_path": str(ctx.out / "export" / name)}}


def _redirected(ctx: Context, policy: dict) -> dict:
    """A policy of evaluate.yaml with its export folders moved under `<out>/export/`."""
    policy = json.loads(json.dumps(policy))
    bon = policy.get("best_of_n") or {}
    for spec in (policy.get("model"), bon.get("base")):
        if isinstance(spec, dict) and spec.get("name_or_path"):
            spec["name_or_path"] = str(ctx.out / "export" / Path(spec["name_or_path"]).name)
    return policy


def _policy_row(report: dict, name: str) -> dict:
    return next(r for r in report["policies"] if r["name"] == name and r["n"] is None)


STAGES: list[Stage] = [
    Stage("prepare", prepare_stage, "generate the embedded sentiment task"),
    Stage("sft", sft_stage, "supervised fine-tuning"),
    Stage("label", label_stage, "collect ranked comparisons from the SFT policy"),
    Stage("reward", reward_stage, "reward model on the rankings"),
    Stage("ppo", ppo_stage, "PPO against the reward model"),
    Stage("evaluate", evaluate_stage, "rlhf evaluate: SFT vs PPO vs best-of-N on held-out prompts"),
]
# Run on request (`--stages overopt`, after the main pipeline): not part of the default run.
EXTRA_STAGES: list[Stage] = [
    Stage("overopt", overopt_stage, "over-optimisation demo (kl_coef 0, longer)"),
    Stage("compare", compare_stage, "PPO vs GRPO, RLOO, REINFORCE++ at equal budget"),
]

SUMMARY_KEYS = {
    "sft_val_loss": ("sft", "sft/val/loss"),
    "rm_val_accuracy": ("reward", "reward/val/accuracy"),
    "gold_sft": ("evaluate", "gold_sft"),
    "gold_ppo": ("evaluate", "gold_ppo"),
    "kl_final": ("ppo", "ppo/objective/kl"),
    "kl_ppo_held_out": ("evaluate", "kl_ppo"),
    "win_rate_ppo": ("evaluate", "win_rate_ppo"),
    "gold_best_of_n": ("evaluate", "gold_best_of_n"),
    "kl_best_of_n": ("evaluate", "kl_best_of_n"),
    "ppo_minus_best_of_n": ("evaluate", "ppo_minus_best_of_n"),
    "ppo_vs_best_of_n": ("evaluate", "ppo_vs_best_of_n"),
}


def write_summary(ctx: Context) -> dict | None:
    """`summary.json` of a full run (None when a stage it needs did not run)."""
    if not all(stage in ctx.results for stage, _ in SUMMARY_KEYS.values()):
        return None
    summary = {name: ctx.results[stage].get(key) for name, (stage, key) in SUMMARY_KEYS.items()}
    summary["seconds"] = {name: result["seconds"] for name, result in ctx.results.items()}
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_table(rows: list[tuple[str, float, dict]]) -> str:
    """Plain-text table: stage | seconds | headline numbers."""
    lines = [f"{'stage':<10} {'seconds':>8}  result", "-" * 72]
    for name, seconds, result in rows:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in result.items() if k != "log_dir")
        lines.append(f"{name:<10} {seconds:>8.1f}  {shown}")
    total = sum(seconds for _, seconds, _ in rows)
    lines += ["-" * 72, f"{'total':<10} {total:>8.1f}"]
    return "\n".join(lines)


def run_pipeline(ctx: Context, stages: list[Stage]) -> list[tuple[str, float, dict]]:
    """Run `stages` in order; returns (name, seconds, result) rows."""
    rows = []
    for stage in stages:
        print(f"== quickstart stage '{stage.name}': {stage.description}", flush=True)
        start = time.perf_counter()
        result = stage.run(ctx)
        seconds = time.perf_counter() - start
        ctx.results[stage.name] = {"seconds": round(seconds, 2), **result}
        rows.append((stage.name, seconds, result))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the embedded RLHF quickstart pipeline.")
    parser.add_argument("--out", default="runs/quickstart", help="output folder")
    parser.add_argument("--configs", default=str(REPO_ROOT / "configs" / "quickstart"))
    parser.add_argument("--seed", type=int, default=0, help="seed of data and training")
    parser.add_argument(
        "--stages",
        default=None,
        help="comma-separated subset of: " + ",".join(s.name for s in STAGES + EXTRA_STAGES),
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="CLI override for every fit stage, e.g. trainer.max_steps=10, or for one stage, "
        "e.g. label:limit=32 or ppo:trainer.max_steps=8 (repeatable)",
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    everything = STAGES + EXTRA_STAGES
    wanted = args.stages.split(",") if args.stages else [s.name for s in STAGES]
    unknown = sorted(set(wanted) - {s.name for s in everything})
    if unknown:
        parser.error(f"unknown stage(s): {', '.join(unknown)}")
    ctx = Context(
        out=Path(args.out), configs=Path(args.configs), seed=args.seed, overrides=args.override
    )
    ctx.out.mkdir(parents=True, exist_ok=True)
    try:
        rows = run_pipeline(ctx, [s for s in everything if s.name in wanted])
    except Exception as err:  # report which stage failed, in one line, then the traceback
        print(f"quickstart: stage failed: {type(err).__name__}: {err}", file=sys.stderr)
        raise
    print(summary_table(rows))
    (ctx.out / "stages.json").write_text(json.dumps(ctx.results, indent=2))
    summary = write_summary(ctx)
    if summary is not None:
        print(
            "summary: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items() if k != "seconds")
        )
        print(f"written: {ctx.out / 'summary.json'}")
    print(f"TensorBoard: tensorboard --logdir {ctx.out / 'tb'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
