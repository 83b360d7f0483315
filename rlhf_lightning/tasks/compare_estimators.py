"""PPO vs critic-free estimators (GRPO, RLOO, REINFORCE++) on the embedded task at an equal budget.

`python -m rlhf_lightning.tasks.quickstart --stages compare` (after a full quickstart run, which
leaves `<out>/export/{sft,reward}` and `<out>/data`) trains each method of `METHODS` with
`rlhf fit --config ppo.yaml [--config <overlay>.yaml]` (32 responses × 32 iterations each, the
budget the overlays define), EACH IN ITS OWN CHILD PROCESS, with the parent's thread count:
the child's wall time and peak RSS are the method's. Peak RSS is the child's own high-water mark
(`VmHWM` of /proc/self/status, read by the child at its end); `os.wait4`'s `ru_maxrss` is kept
as `rusage_maxrss_mb` but is only an upper bound on Linux: it starts from the parent's RSS at
spawn time (the kernel carries the forked address space's high-water mark across `exec`).
The child (`python -m rlhf_lightning.tasks.compare_estimators --child METHOD`) runs the `rlhf`
CLI in-process and dumps the trained module's final tags, budget and models in memory as JSON. Then one `rlhf evaluate` run samples the SFT policy and every trained policy on the same
held-out prompts (`<out>/data/sft_val.jsonl`, configs/quickstart/evaluate.yaml's sampling) and
reports gold, proxy, win rate vs SFT and sequence KL to SFT. The table goes to
`<out>/compare/estimators.{md,json}`; docs/critic_free.md has a measured copy and its reading.

Standalone: `python -m rlhf_lightning.tasks.compare_estimators --out runs/quickstart
[--methods ppo,grpo] [--threads 1] [--override compare:trainer.limit_train_batches=4]`.
Overrides: unscoped `KEY=VALUE` and `compare:KEY=VALUE` go to every method's fit,
`compare_<method>:KEY=VALUE` to one method, `evaluate:KEY=VALUE` to the held-out evaluation.

References: Schulman et al. 2017 (PPO); Shao et al. 2024 (GRPO); Liu et al. 2025 (Dr. GRPO);
Ahmadian et al. 2024 (RLOO); Hu 2025 (REINFORCE++).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_lightning.tasks import quickstart

METHODS: dict[str, list[str]] = {
    "ppo": ["ppo.yaml"],
    "grpo": ["ppo.yaml", "grpo.yaml"],
    "rloo": ["ppo.yaml", "rloo.yaml"],
    "reinforce_pp": ["ppo.yaml", "reinforce_pp.yaml"],
}
"""Method name → config files given to `rlhf fit`, base first (the overlay's values win)."""

MODEL_SLOTS = ("policy", "reference", "critic", "value_head", "reward_model")
"""PPOModule attributes that hold a model (None when absent)."""

FINAL_TAGS = {
    "train_reward_raw": "ppo/objective/reward_raw",
    "train_kl": "ppo/objective/kl",
    "train_gold": "ppo/objective/gold",
}
"""Result key → the module history's tag, read at the last iteration."""


@dataclass
class ChildRun:
    """Resource usage of one finished child process."""

    returncode: int
    """Exit code (negative: killed by that signal)."""
    wall_s: float
    """Wall-clock seconds from start to exit."""
    rusage_maxrss_mb: float | None
    """`ru_maxrss` of the child from `os.wait4` in MiB (None where it is missing). On Linux this
    is max(parent's RSS when the child was spawned, the child's own peak): an upper bound."""


def _rss_mb(rusage) -> float:
    """`ru_maxrss` in MiB: kilobytes on Linux, bytes on macOS."""
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return rusage.ru_maxrss * scale / 2**20


def run_child(argv: list[str], log_path: Path, env: dict | None = None) -> ChildRun:
    """Run `argv` as a child process (output to `log_path`); its wall time and peak RSS.

    `os.wait4` returns the resource usage of exactly this child (plus children it waited for),
    not of earlier children; its `ru_maxrss` includes the parent's RSS at spawn time on Linux
    (see `ChildRun.rusage_maxrss_mb`), so the child also reports `own_peak_rss_mb` itself.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        if hasattr(os, "wait4"):
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            return ChildRun(proc.returncode, wall, _rss_mb(usage))
        code = proc.wait()
        return ChildRun(code, time.perf_counter() - start, None)


def own_peak_rss_mb() -> float | None:
    """This process's own peak RSS in MiB since its `exec`: `VmHWM` of /proc/self/status
    (Linux; None elsewhere). Unlike `ru_maxrss` it does not include the parent's RSS."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB → MiB
    return None


def parse_methods(text: str | None) -> list[str]:
    """Comma-separated method names (None = all of `METHODS`), in the order given."""
    if not text:
        return list(METHODS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise ValueError(
            f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(METHODS)}"
        )
    return names


def fit_argv(ctx: quickstart.Context, method: str) -> list[str]:
    """`rlhf fit` arguments of one method: its configs, paths under `<out>`, then overrides.

    TensorBoard run `<out>/tb/compare_<method>`, export `<out>/compare/export/<method>`; the
    SFT/reward exports and prompts are the quickstart's (as in its `ppo` stage).
    """
    version = f"compare_{method}"
    argv = ["fit"]
    for name in METHODS[method]:
        argv += ["--config", str(ctx.config(name))]
    overrides = quickstart._ppo_overrides(ctx, method)  # the ppo stage's paths
    overrides["model.init_args.export_dir"] = str(ctx.out / "compare" / "export" / method)
    argv += [
        f"--trainer.default_root_dir={ctx.out}",
        f"--trainer.logger.init_args.save_dir={ctx.out}",
        f"--trainer.logger.init_args.version={version}",
    ]
    argv += [f"--{key}={value}" for key, value in overrides.items()]
    argv += ctx.stage_overrides("compare")
    argv += ctx.stage_overrides(version, unscoped=False)
    return argv


def model_inventory(module) -> dict:
    """Models held by a PPOModule: names, count and parameters (shared tensors counted once)."""
    seen: set[int] = set()
    names, per_model = [], {}
    for slot in MODEL_SLOTS:
        model = getattr(module, slot, None)
        if model is None:
            continue
        fresh = [p for p in model.parameters() if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        names.append(slot)
        per_model[slot] = sum(p.numel() for p in fresh)
    return {
        "models": names,
        "model_count": len(names),
        "params": per_model,
        "params_total": sum(per_model.values()),
    }


def training_summary(module) -> dict:
    """Final training tags, budget and models of a fitted PPOModule (JSON-ready)."""
    history = module.history
    last = history[-1] if history else {}
    summary = {key: last.get(tag) for key, tag in FINAL_TAGS.items()}
    summary["iterations"] = len(history)
    batch = getattr(getattr(module.trainer, "datamodule", None), "batch_size", None)
    k = module.generation_cfg.samples_per_prompt
    summary["responses_per_iteration"] = None if batch is None else batch * k
    summary["train_s"] = sum(h.get("ppo/perf/iteration_s", 0.0) for h in history)
    summary["advantage"] = module.update_cfg.advantage
    summary["kl_estimator"] = module.kl_cfg.estimator
    summary["kl_mode"] = module.kl_cfg.mode
    summary.update(model_inventory(module))
    return summary


def child_main(ctx: quickstart.Context, method: str, result: Path) -> None:
    """Child side: fit one method in-process and write `training_summary` to `result`."""
    from rlhf_lightning.cli import run_cli

    cli = run_cli(fit_argv(ctx, method))
    summary = training_summary(cli.model)
    summary["global_step"] = cli.trainer.global_step
    summary["peak_rss_mb"] = own_peak_rss_mb()
    result.write_text(json.dumps(summary, indent=2))


def child_command(ctx: quickstart.Context, method: str, result: Path, threads: int) -> list[str]:
    """The command line of one method's child process."""
    argv = [sys.executable, "-m", "rlhf_lightning.tasks.compare_estimators", "--child", method]
    argv += ["--out", str(ctx.out), "--configs", str(ctx.configs), "--seed", str(ctx.seed)]
    argv += ["--threads", str(threads), "--result", str(result)]
    for item in ctx.overrides:
        argv += ["--override", item]
    return argv


def train_methods(ctx: quickstart.Context, methods: list[str], threads: int) -> dict[str, dict]:
    """Fit every method in its own child process; per method: its summary + wall time + RSS."""
    folder = ctx.out / "compare"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    found = {}
    for method in methods:
        result, log = folder / f"{method}.json", folder / f"{method}.log"
        result.unlink(missing_ok=True)
        print(f"== compare: training {method} (log: {log})", flush=True)
        run = run_child(child_command(ctx, method, result, threads), log, env)
        if run.returncode != 0 or not result.is_file():
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
            raise RuntimeError(
                f"compare: method '{method}' failed (exit {run.returncode}); log: {log}\n{tail}"
            )
        row = {**asdict(run), **json.loads(result.read_text())}
        if row.get("peak_rss_mb") is None:  # no VmHWM: the upper bound is all there is
            row["peak_rss_mb"] = run.rusage_maxrss_mb
        found[method] = row
    return found


def evaluate_held_out(ctx: quickstart.Context, methods: list[str]) -> dict:
    """One `rlhf evaluate` run: SFT + every method's export on the held-out prompts."""
    from rlhf_lightning.evaluation.run import main as evaluate_main

    out = ctx.out
    exports = [("sft", out / "export" / "sft")]
    exports += [(method, out / "compare" / "export" / method) for method in methods]
    # `best_of_n: null` explicitly: a `--policies` list given on top of evaluate.yaml's list is
    # merged item by item, so the config's best-of-N entry would otherwise leak into item 2.
    policies = [
        {"name": name, "model": {"name_or_path": str(path)}, "best_of_n": None}
        for name, path in exports
    ]
    return evaluate_main(
        [
            "--config", str(ctx.config("evaluate.yaml")),
            f"--policies={json.dumps(policies)}",
            f"--prompts.path={out / 'data' / 'sft_val.jsonl'}",
            f"--proxy.reward_model={out / 'export' / 'reward'}",
            f"--out_dir={out / 'compare' / 'evaluate'}",
            f"--sampling.seed={ctx.seed}",
            "--baseline=sft",
            "--reference=null",
            *ctx.stage_overrides("evaluate", unscoped=False),
        ]
    )  # fmt: skip


HELD_OUT_KEYS = {"gold": "gold", "proxy": "proxy", "win_rate": "win_rate", "kl": "kl"}
"""Table key → `rlhf evaluate` report row key (held-out prompts, KL to the SFT policy)."""


def table_rows(trained: dict[str, dict], report: dict) -> list[dict]:
    """One row per policy: the SFT baseline first, then the methods in training order."""
    held = {r["name"]: r for r in report["policies"] if r.get("n") is None}
    rows = []
    for name in ["sft", *trained]:
        row = {"method": name}
        row.update({key: held[name][src] for key, src in HELD_OUT_KEYS.items()})
        row.update(trained.get(name, {}))
        rows.append(row)
    return rows


COLUMNS = [
    ("method", "method", "{}"),
    ("gold", "gold (held-out)", "{:.3f}"),
    ("win_rate", "win vs SFT", "{:.3f}"),
    ("kl", "KL to SFT (held-out, nats/seq)", "{:.2f}"),
    ("proxy", "proxy RM (held-out)", "{:.2f}"),
    ("train_reward_raw", "proxy RM (train, last iter)", "{:.2f}"),
    ("train_kl", "KL (train, last iter)", "{:.2f}"),
    ("iterations", "iterations × responses", "{}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("train_s", "iteration s", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MiB", "{:.0f}"),
    ("models", "models in memory", "{}"),
    ("params_total", "parameters", "{:,}"),
]
"""(row key, header, format) of the markdown table."""


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    if key == "models":
        return f"{len(value)}: " + ", ".join(value)
    if key == "iterations":
        return f"{value} × {row.get('responses_per_iteration')}"
    if key == "train_kl" and row.get("kl_estimator"):
        return fmt.format(value) + f" ({row['kl_estimator']})"
    return fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a markdown table (missing values as —)."""
    lines = ["| " + " | ".join(header for _, header, _ in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo; `platform.processor()` elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def write_table(rows: list[dict], folder: Path, meta: dict) -> tuple[Path, Path]:
    """`<folder>/estimators.md` (header lines from `meta` + the table) and `estimators.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / "estimators.md", folder / "estimators.json"
    header = [f"- {key}: {value}" for key, value in meta.items()]
    md.write_text(
        "\n".join(["# Estimator comparison", "", *header, "", markdown_table(rows)]) + "\n"
    )
    js.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return md, js


def compare(ctx: quickstart.Context, methods: list[str] | None = None) -> dict:
    """Train `methods` (default: all) in child processes, evaluate held-out, write the table."""
    import torch

    methods = methods or list(METHODS)
    threads = torch.get_num_threads()
    trained = train_methods(ctx, methods, threads)
    report = evaluate_held_out(ctx, methods)
    rows = table_rows(trained, report)
    meta = {
        "methods": ", ".join(methods),
        "cpu": cpu_model(),
        "torch_threads": threads,
        "seed": ctx.seed,
        "torch": torch.__version__,
        "held_out_report": str(ctx.out / "compare" / "evaluate" / "report.md"),
    }
    md, _ = write_table(rows, ctx.out / "compare", meta)
    print(markdown_table(rows))
    print(f"written: {md}")
    return {f"gold_{row['method']}": row["gold"] for row in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="quickstart output folder")
    parser.add_argument("--configs", default=str(quickstart.REPO_ROOT / "configs" / "quickstart"))
    parser.add_argument("--seed", type=int, default=0, help="seed of training and sampling")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--methods", default=None, help="comma-separated: " + ",".join(METHODS))
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--child", default=None, choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        methods = parse_methods(args.methods)
    except ValueError as err:
        parser.error(str(err))
    if args.child and not args.result:
        parser.error("--child needs --result (the JSON file the child writes)")

    import torch

    torch.set_num_threads(args.threads)
    ctx = quickstart.Context(
        out=Path(args.out), configs=Path(args.configs), seed=args.seed, overrides=args.override
    )
    if args.child:
        child_main(ctx, args.child, Path(args.result))
    else:
        compare(ctx, methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
