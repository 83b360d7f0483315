"""The sides of the PPO-iteration benchmark (`bench_ppo_step.py`): processes, peak RSS, table, CSV.

Every side that is compared for memory runs in a process of its own, and its peak resident set
size is that process's `ru_maxrss`: from `os.wait4` for a subprocess (TRL 1.12 in the TRL venv;
our PPO when a critic-free run is compared with it) and from `getrusage(RUSAGE_SELF)` for the
side that runs in the benchmark's own process. `ru_maxrss` of a waited child covers that child
(and any descendant it waited for), never the parent, so the numbers of different sides do not
mix. Reference: getrusage(2), wait4(2) (Linux: `ru_maxrss` in KiB).
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from benchmarks.results_io import git_sha, utc_timestamp
from benchmarks.trl_ppo_baseline import OS_KEYS

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("iteration_s", "iteration_cpu_s", "rollout_s", "score_s", "logprob_s", "update_s")
RSS_TARGET = 0.7
"""Issue #11: a critic-free iteration's peak RSS ≤ 0.7 × our PPO's."""
TIME_TARGET = 0.7
"""Issue #13 (replacing #5's 0.5, which lay below the GEMM floor): our iteration ≤ 0.70 × the
TRL 1.12 PPO iteration; every phase ≤ 1.0 × TRL's."""
PHASE_TARGET = 1.0
FLOOR_TARGET = 1.25
"""Issue #13: our iteration ≤ 1.25 × the padded float32 GEMM floor measured in the same run."""

RATIO_HEADS = {"our PPO": "ours/PPO", "TRL 1.12 PPO": "ours/TRL"}
"""Column heads of the ratios ours / side in the printed table."""

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
    "advantage",
    "samples_per_prompt",
    "peak_rss_mb",
    "rss_ratio_vs_ppo",
    "floor_s_padded",
    "ratio_vs_floor",
    "compile",
    "padding_free",
    "reuse_critic_forward",
)


def self_peak_rss_mb() -> float:
    """Peak RSS of this process so far, MiB (Linux `ru_maxrss` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_measured(cmd: list[str], env: dict | None = None) -> float:
    """Run `cmd` to completion; its peak RSS in MiB (from `os.wait4`). Raises on a non-zero exit."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return usage.ru_maxrss / 1024


def _size_flags(work) -> list[str]:
    return [
        "--iterations",
        str(work.iterations),
        "--threads",
        str(work.threads),
        "--layers",
        str(work.layers),
        "--hidden",
        str(work.hidden),
    ]


def run_trl(work, python: str, out: Path) -> dict:
    """`trl_ppo_baseline.py` (8 prompts × 1 sample) in the TRL interpreter; its JSON + peak RSS."""
    cmd = [python, str(ROOT / "benchmarks" / "trl_ppo_baseline.py"), *_size_flags(work)]
    cmd += ["--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    print("[trl] " + " ".join(cmd), flush=True)
    peak = run_measured(cmd, env)
    return {**json.loads(out.read_text()), "peak_rss_mb": peak}


def run_our_ppo(work, out: Path) -> dict:
    """Our PPO (`gae`, critic from the RM, 1 sample per prompt) in a subprocess of this benchmark;
    its result JSON, with the peak RSS that `os.wait4` reports for that process."""
    cmd = [sys.executable, "-m", "benchmarks.bench_ppo_step", *_size_flags(work)]
    cmd += ["--advantage", "gae", "--samples-per-prompt", "1", "--no-csv", "--out-json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print("[ppo] " + " ".join(cmd), flush=True)
    peak = run_measured(cmd, env)
    return {**json.loads(out.read_text())["ours"], "peak_rss_mb": peak}


def _verdict(value: float, target: float) -> str:
    """`(target ≤ x: met)` or `(… NOT met)` for a ratio `value` against its upper bound."""
    return f"(target ≤ {target:.2f}: {'met' if value <= target else 'NOT met'})"


def fmt(row: dict) -> str:
    """One iteration's phases as `key=seconds` pairs."""
    return " ".join(f"{k}={row[k]:.2f}" for k in PHASES if k in row)


def print_table(sides: list[tuple[str, dict]]) -> dict:
    """Medians of `sides` ([(label, result)], ours first) with ours / each other side; returns
    {"ratio_iteration_s": ours/TRL or None, "rss_ratio_vs_ppo": ours/our PPO or None}."""
    (_, ours), others = sides[0], sides[1:]
    head = f"\n{'median':<20}" + "".join(f"{label:>14}" for label, _ in sides)
    print(head + "".join(f"{RATIO_HEADS.get(label, 'ours/' + label):>12}" for label, _ in others))
    for key in (*PHASES, *OS_KEYS, "tokens_per_s", "gen_tokens_per_s", "peak_rss_mb"):
        if not all(key in side for _, side in sides):
            continue
        line = f"{key:<20}" + "".join(f"{side[key]:>14.2f}" for _, side in sides)
        for _, other in others:
            line += f"{ours[key] / other[key] if other[key] else float('nan'):>12.2f}"
        print(line)
    found = dict(others)
    trl, ppo = found.get("TRL 1.12 PPO"), found.get("our PPO")
    out = {"ratio_iteration_s": None, "rss_ratio_vs_ppo": None}
    if trl:
        ratio = out["ratio_iteration_s"] = ours["iteration_s"] / trl["iteration_s"]
        print(f"\nours / TRL iteration time = {ratio:.2f} {_verdict(ratio, TIME_TARGET)}")
        cpu_ratio = ours["iteration_cpu_s"] / trl["iteration_cpu_s"]
        print(f"ours / TRL iteration CPU time = {cpu_ratio:.2f} (less sensitive to other load)")
        for key in PHASES[2:]:
            phase = out[f"ratio_{key}"] = ours[key] / trl[key]
            print(f"ours / TRL {key} = {phase:.2f} {_verdict(phase, PHASE_TARGET)}")
    if ppo:
        rss = out["rss_ratio_vs_ppo"] = ours["peak_rss_mb"] / ppo["peak_rss_mb"]
        print(f"ours / our PPO peak RSS = {rss:.2f} {_verdict(rss, RSS_TARGET)}")
        time_vs_ppo = ours["iteration_s"] / ppo["iteration_s"]
        print(f"ours / our PPO iteration time = {time_vs_ppo:.2f}")
    return out


def print_floor(floor: dict | None, sides: list[tuple[str, dict]]) -> dict:
    """Each side's iteration / the padded GEMM floor of this run (ours first, target ≤ 1.25);
    {"ratio_vs_floor": ours / floor or None}."""
    if not floor:
        return {"ratio_vs_floor": None}
    print(
        f"\nfloat32 GEMM floor (this run): {floor['floor_s_padded']:.2f} s padded, "
        f"{floor['floor_s_padding_free']:.2f} s padding-free ({floor['gemm_gflops']:.0f} GFLOP/s, "
        f"decode {floor['decode_gemm_gflops']:.0f}; {floor['tflops_total_padded']:.2f} TFLOP)"
    )
    ratios = [side["iteration_s"] / floor["floor_s_padded"] for _, side in sides]
    for i, ((label, _), r) in enumerate(zip(sides, ratios)):
        print(f"{label} / floor = {r:.2f}" + (f" {_verdict(r, FLOOR_TARGET)}" if i == 0 else ""))
    if "floor_s_padded_streamed" in floor:
        streamed = floor["floor_s_padded_streamed"]
        print(
            f"with decode weights streamed from memory ({floor['decode_streamed_gemm_gflops']:.0f}"
            f" GFLOP/s): floor {streamed:.2f} s, {sides[0][0]} / streamed floor = "
            f"{sides[0][1]['iteration_s'] / streamed:.2f} (for information; the target uses the "
            "padded floor)"
        )
    return {"ratio_vs_floor": ratios[0]}


def csv_row(result: dict, work, impl: str, version: str, **extra) -> dict:
    """One `ppo_step.csv` row of a side's `result` (phases rounded; workload and machine)."""
    keys = (*PHASES, "tokens_per_s", "gen_tokens_per_s", "peak_rss_mb")
    row = {k: round(result[k], 4) for k in keys if k in result}
    row.update(result["machine"])
    row.update(asdict(work))
    row.update(impl=impl, version=version, timed_iterations=result["timed_iterations"], **extra)
    return row


def append_rows(path: Path, rows: list[dict], stamp: dict) -> None:
    """Append `rows` (each updated with `stamp`: time, git sha) to the CSV at `path`; a file with
    an older header (a prefix of `CSV_FIELDS`) is rewritten first with the new columns empty."""
    if path.exists():
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            old = list(reader)
            fields = tuple(reader.fieldnames or ())
        if fields != CSV_FIELDS:
            if CSV_FIELDS[: len(fields)] != fields:
                raise SystemExit(f"{path}: unexpected header {fields}; move the file aside")
            _write(path, old, "w")
    _write(path, [{**row, **stamp} for row in rows], "a")


def _write(path: Path, rows: list[dict], mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = mode == "w" or not path.exists()
    with path.open(mode, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def write_csv(path: Path, work, sides: dict, ratios: dict, floor: dict | None) -> None:
    """Rows of ours, our PPO and TRL (those that ran) appended to the CSV at `path`."""
    import rlhf_lightning

    version = getattr(rlhf_lightning, "__version__", "dev")
    trl, ppo, ours = sides.get("trl"), sides.get("ppo"), sides["ours"]

    def vs_trl(side: dict):
        return round(side["iteration_s"] / trl["iteration_s"], 3) if trl else ""

    rss = ratios["rss_ratio_vs_ppo"]
    est = {"advantage": ours["advantage"], "samples_per_prompt": ours["samples_per_prompt"]}
    rows = [
        csv_row(
            ours,
            work,
            "rlhf_lightning",
            version,
            ratio_vs_trl=vs_trl(ours),
            rss_ratio_vs_ppo=round(rss, 3) if rss else "",
            floor_s_padded=floor["floor_s_padded"] if floor else "",
            ratio_vs_floor=round(ratios["ratio_vs_floor"], 3) if floor else "",
            compile=ours.get("compile", False),
            padding_free=ours.get("padding_free", ""),
            reuse_critic_forward=ours.get("reuse_critic_forward", ""),
            **est,
        )
    ]
    gae = {"advantage": "gae", "samples_per_prompt": 1}
    if ppo:
        rows.append(csv_row(ppo, work, "rlhf_lightning", version, **gae, ratio_vs_trl=vs_trl(ppo)))
    if trl:
        rows.append(csv_row(trl, work, "trl", trl.get("trl", "1.12.0"), **gae))
    append_rows(path, rows, {"timestamp_utc": utc_timestamp(), "git_sha": git_sha(ROOT)})
    print(f"appended {len(rows)} row(s) to {path}")
