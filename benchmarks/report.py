"""Formatting of benchmark rows: CSV columns, markdown table with target ratios, PNG plot."""

from __future__ import annotations

from pathlib import Path

CSV_FIELDS = (
    "timestamp",
    "suite",
    "family",
    "provider",
    "mode",
    "dtype",
    "n",
    "vocab",
    "hidden",
    "repeats",
    "time_ms",
    "time_p20_ms",
    "time_p80_ms",
    "peak_mem_mb",
    "gbps",
    "pct_peak_bw",
    "bytes_min_per_token",
    "threads",
    "status",
    "machine",
    "torch",
    "triton",
    "git_sha",
)


def case_key(c: dict) -> str:
    return f"{c['family']}/{c['provider']}/{c['mode']}/V{c['vocab']}"


def _shape(c: dict) -> str:
    h = f" H={c['hidden']}" if c["family"] == "linear_token_stats" else ""
    return f"N={c['n']} V={c['vocab']}{h} {c['dtype']}"


def _num(x, fmt="{:.1f}"):
    return "" if x is None or x == "" else fmt.format(x)


def format_row(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{case_key(r)} {_shape(r)}: {r.get('status')}"
    return (
        f"{r['family']:<18} {r['provider']:<8} {r['mode']:<8} {_shape(r):<34} "
        f"{r['time_ms']:>10.1f} ms  {r['peak_mem_mb']:>9.1f} MB"
    )


def _find(rows, family, provider, target):
    for r in rows:
        if (
            r.get("status") == "ok"
            and r["family"] == family
            and r["provider"] == provider
            and all(r[k] == v for k, v in target.items())
        ):
            return r
    return None


def target_lines(rows: list[dict], target: dict) -> list[str]:
    """The issue-#3 acceptance ratios, measured from ``rows``."""
    out = []
    naive = _find(rows, "linear_token_stats", "naive", target)
    fused = _find(rows, "linear_token_stats", "chunked", target)
    if naive and fused:
        mem = fused["peak_mem_mb"] / max(naive["peak_mem_mb"], 1e-9)
        tim = fused["time_ms"] / naive["time_ms"]
        out.append(
            f"- linear_token_stats vs naive torch: peak memory **{mem:.1%}** "
            f"(target ≤ 10%: {'met' if mem <= 0.10 else 'NOT met'}), "
            f"time **{tim:.2f}×** (target ≤ 1.0×: {'met' if tim <= 1.0 else 'NOT met'})"
        )
    trl = _find(rows, "token_stats", "trl", target)
    ours = _find(rows, "token_stats", "chunked", target)
    if trl and ours:
        tim = ours["time_ms"] / trl["time_ms"]
        mem = ours["peak_mem_mb"] / max(trl["peak_mem_mb"], 1e-9)
        out.append(
            f"- token_stats (chunked torch) vs TRL-style torch: time **{tim:.2f}×** "
            f"(target ≤ 0.8×: {'met' if tim <= 0.8 else 'NOT met'}), peak memory {mem:.1%}"
        )
    naive_ts = _find(rows, "token_stats", "naive", target)
    if naive_ts and ours:
        tim = ours["time_ms"] / naive_ts["time_ms"]
        mem = ours["peak_mem_mb"] / max(naive_ts["peak_mem_mb"], 1e-9)
        out.append(
            f"- token_stats (chunked torch) vs naive torch: time {tim:.2f}×, peak memory {mem:.1%}"
        )
    return out or ["- target cases missing from this run"]


def markdown(rows: list[dict], meta: dict, target: dict) -> str:
    lines = [
        "# Kernel benchmarks",
        "",
        f"machine: {meta['machine']} · torch {meta['torch']} · triton {meta['triton']} · "
        f"git {meta['git_sha']} · {rows[0]['timestamp'] if rows else ''} · "
        f"load average before the run {meta.get('loadavg_1m', '?')}",
        "",
        "## Targets (issue #3: float32, N=2048, H=896, V=151936, forward+backward)",
        "",
        *target_lines(rows, target),
        "",
        "## All cases",
        "",
        "CPU: time = median wall time of `repeats` runs; peak memory = peak RSS above the "
        "RSS after the inputs were built (fresh process per case; `backward` includes its "
        "forward). GPU: do_bench median and GB/s of the minimum traffic.",
        "",
        "| family | provider | mode | shape | time ms | peak MB | GB/s | status |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['provider']} | {r['mode']} | {_shape(r)} | "
            f"{_num(r.get('time_ms'))} | {_num(r.get('peak_mem_mb'))} | "
            f"{_num(r.get('gbps'))} | {r.get('status', '')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Two panels (time, peak memory) of grouped bars: one group per case, one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    groups = []
    for r in ok:
        key = (r["family"], r["mode"], _shape(r))
        if key not in groups:
            groups.append(key)
    providers = sorted({r["provider"] for r in ok})
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(groups)), 9), sharex=True)
    width = 0.8 / max(1, len(providers))
    for ax, field, label in (
        (axes[0], "time_ms", "time (ms, log)"),
        (axes[1], "peak_mem_mb", "peak memory (MB, log)"),
    ):
        for j, prov in enumerate(providers):
            xs, ys = [], []
            for i, key in enumerate(groups):
                r = next(
                    (
                        r
                        for r in ok
                        if (r["family"], r["mode"], _shape(r)) == key and r["provider"] == prov
                    ),
                    None,
                )
                if r is not None:
                    xs.append(i + j * width)
                    ys.append(max(r[field], 1e-3))
            ax.bar(xs, ys, width=width, label=prov)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    axes[1].set_xticklabels([f"{f}\n{m}\n{s}" for f, m, s in groups], rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
