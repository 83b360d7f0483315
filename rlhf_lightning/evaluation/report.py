"""The evaluation report: numbers per policy, best-of-N comparison, side-by-side samples; written
as report.json, report.md, TensorBoard (scalars + a text table) and gold_vs_kl.png.

One row per model policy and one per (best-of-N policy, N). `kl` is the value plotted: the
measured sequence KL to the reference for a model policy, the analytic bound log N − (N − 1)/N
for best-of-N (whose measured KL of the kept samples, base vs reference, is `kl_measured`).
report.json holds only what the inputs determine (no timings, no output paths), so the same inputs
give the same file. The plot (matplotlib, Agg backend) has one point per model policy and a line
per best-of-N policy over its N values.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np

from rlhf_lightning.evaluation import best_of_n, metrics
from rlhf_lightning.labeling import prompt_for_labeler

__all__ = ["build", "write", "markdown", "console_table", "plot"]


def label(row: dict) -> str:
    """Display name: the policy name, with `N=<n>` for a best-of-N row."""
    return row["name"] if row.get("n") is None else f"{row['name']} (N={row['n']})"


def _row(found, baseline_gold: np.ndarray, session) -> dict:
    cfg = session.cfg
    per_prompt = cfg.sampling.samples_per_prompt
    gold = np.asarray(found.gold).reshape(-1, per_prompt)  # [P, S]
    wins = metrics.prompt_wins(gold, baseline_gold)  # [P]
    low, high = metrics.bootstrap_interval(
        wins, resamples=cfg.bootstrap_resamples, seed=cfg.sampling.seed
    )
    measured = statistics.fmean(found.logratio)
    row = {"name": found.name, "n": found.n, "base": found.base}
    row.update(
        proxy=statistics.fmean(found.proxy),
        gold=statistics.fmean(found.gold),
        gold_std=statistics.pstdev(found.gold),
        win_rate=float(wins.mean()),
        win_rate_ci=[low, high],
        kl=best_of_n.analytic_kl(found.n) if found.n is not None else measured,
        kl_measured=measured,
    )
    row.update(metrics.response_stats(found.texts, found.lengths, found.ends, cfg.distinct_n))
    return row


def comparisons(rows: list[dict], skip: set[str]) -> list[dict]:
    """Every model policy (not in `skip`) against every best-of-N curve, at the policy's KL."""
    curves: dict[str, list[dict]] = {}
    for row in rows:
        if row["n"] is not None:
            curves.setdefault(row["name"], []).append(row)
    found = []
    for row in (r for r in rows if r["n"] is None and r["name"] not in skip):
        for curve, points in curves.items():
            if row["name"] == points[0]["base"]:
                continue
            points = sorted(points, key=lambda p: p["kl"])
            compared = best_of_n.compare_at_equal_kl(
                row["kl"], row["gold"], [p["kl"] for p in points], [p["gold"] for p in points]
            )
            top = points[-1]
            compared.update(policy=row["name"], curve=curve, kl=row["kl"], gold=row["gold"])
            compared.update(largest_n=top["n"], gold_at_largest_n=top["gold"])
            compared["verdict"] = verdict(compared)
            found.append(compared)
    return found


def verdict(c: dict) -> str:
    """One sentence: does the policy beat the best-of-N curve at equal KL (or is it out of range)."""
    if not c["in_range"]:
        low, high = c["kl_range"]
        return (
            f"{c['policy']}'s KL {c['kl']:.3g} nats lies outside {c['curve']}'s range "
            f"[{low:.3g}, {high:.3g}] (N ≤ {c['largest_n']}): not compared at equal KL; "
            f"{c['curve']} (N={c['largest_n']}) gold {c['gold_at_largest_n']:.4g} vs "
            f"{c['policy']} {c['gold']:.4g}"
        )
    diff = c["gold_minus_bon"]
    word = "beats" if diff > 0 else "loses to" if diff < 0 else "ties"
    return (
        f"{c['policy']} {word} {c['curve']} at equal KL ({c['kl']:.3g} nats): gold "
        f"{c['gold']:.4g} vs {c['bon_gold_at_kl']:.4g} ({diff:+.4g})"
    )


def _side_by_side(results, session) -> list[dict]:
    """First response of every model policy and of each best-of-N policy's largest N."""
    per_prompt = session.cfg.sampling.samples_per_prompt
    largest = {r.name: r.n for r in results if r.n is not None}  # rows are in increasing N
    shown = [r for r in results if r.n is None or r.n == largest[r.name]]
    return [
        {
            "prompt": prompt_for_labeler(messages),
            "responses": {
                label({"name": r.name, "n": r.n}): r.texts[p * per_prompt] for r in shown
            },
        }
        for p, messages in enumerate(session.prompts[: session.cfg.side_by_side])
    ]


def build(session, results) -> dict:
    """The report dict (what report.json holds)."""
    cfg = session.cfg
    per_prompt = cfg.sampling.samples_per_prompt
    baseline = next(r for r in results if r.name == cfg.baseline and r.n is None)
    baseline_gold = np.asarray(baseline.gold).reshape(-1, per_prompt)  # [P, S]
    rows = [_row(found, baseline_gold, session) for found in results]
    reference = cfg.reference or cfg.baseline
    s = cfg.sampling
    settings = {
        "prompts": len(session.prompts),
        "samples_per_prompt": per_prompt,
        "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "seed": s.seed,
        "baseline": cfg.baseline,
        "reference": reference,
        "proxy": cfg.proxy.describe(),
        "gold": cfg.gold.describe(),
        "bootstrap_resamples": cfg.bootstrap_resamples,
        "distinct_n": cfg.distinct_n,
    }
    return {
        "settings": settings,
        "policies": rows,
        "comparisons": comparisons(rows, skip={reference}),
        "samples": _side_by_side(results, session),
    }


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table_row(row: dict, distinct: str) -> str:
    low, high = row["win_rate_ci"]
    cells = [
        label(row),
        _fmt(row["proxy"]),
        _fmt(row["gold"]),
        f"{row['win_rate']:.3f} [{low:.3f}, {high:.3f}]",
        _fmt(row["kl"]),
        _fmt(row["kl_measured"]) if row["n"] is not None else "",
        _fmt(row["length"]),
        _fmt(row["eos_rate"]),
        _fmt(row[distinct]),
    ]
    return "| " + " | ".join(cells) + " |"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def samples_markdown(found: dict) -> str:
    """Side-by-side table: one row per prompt, one column per policy (first sample)."""
    if not found["samples"]:
        return "(no prompts)"
    names = list(found["samples"][0]["responses"])
    lines = ["| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for item in found["samples"]:
        cells = [item["prompt"]] + [item["responses"][n] for n in names]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def markdown(found: dict) -> str:
    """report.md: settings, the table, the best-of-N comparison, the plot and the samples."""
    s = found["settings"]
    distinct = f"distinct_{s['distinct_n']}"
    lines = [
        "# rlhf evaluate",
        "",
        f"{s['prompts']} prompts × {s['samples_per_prompt']} samples, {s['max_new_tokens']} new "
        f"tokens, temperature {s['temperature']}, seed {s['seed']}. Proxy: `{s['proxy']}`; gold: "
        f"`{s['gold']}`. Win rate vs `{s['baseline']}` by gold (ties ½), 95% paired bootstrap "
        f"over prompts ({s['bootstrap_resamples']} resamples). KL to `{s['reference']}` in nats "
        "(best-of-N: log N − (N−1)/N; `KL measured`: its kept samples, base vs reference).",
        "",
        "| policy | proxy | gold | win rate [95% CI] | KL | KL measured | length | EOS rate "
        f"| {distinct} |",
        "|---|---|---|---|---|---|---|---|---|",
        *(_table_row(row, distinct) for row in found["policies"]),
        "",
        "## Best-of-N at equal KL",
        "",
        *([f"- {c['verdict']}" for c in found["comparisons"]] or ["(nothing to compare)"]),
        "",
        "![gold score against KL](gold_vs_kl.png)",
        "",
        "## Samples (first response per policy)",
        "",
        samples_markdown(found),
        "",
    ]
    return "\n".join(lines)


def console_table(found: dict) -> str:
    """Short plain-text table for the terminal."""
    distinct = f"distinct_{found['settings']['distinct_n']}"
    lines = [f"{'policy':<24} {'proxy':>8} {'gold':>8} {'win':>6} {'kl':>8} {distinct:>11}"]
    for row in found["policies"]:
        lines.append(
            f"{label(row):<24} {row['proxy']:>8.4g} {row['gold']:>8.4g} {row['win_rate']:>6.3f} "
            f"{row['kl']:>8.4g} {row[distinct]:>11.4g}"
        )
    lines += [c["verdict"] for c in found["comparisons"]]
    return "\n".join(lines)


def plot(found: dict, path: Path):
    """gold_vs_kl.png: one point per model policy, one line per best-of-N policy over N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    rows = found["policies"]
    for name in dict.fromkeys(r["name"] for r in rows if r["n"] is not None):
        points = sorted(
            (r for r in rows if r["name"] == name and r["n"] is not None), key=lambda r: r["kl"]
        )
        ax.plot(
            [p["kl"] for p in points],
            [p["gold"] for p in points],
            "o-",
            label=f"{name} (best-of-N of {points[0]['base'] or 'its base'})",
        )
        for p in points:
            ax.annotate(
                f"N={p['n']}",
                (p["kl"], p["gold"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
            )
    for row in (r for r in rows if r["n"] is None):
        ax.plot([row["kl"]], [row["gold"]], "s", markersize=8, label=row["name"])
    s = found["settings"]
    ax.set_xlabel(f"KL to {s['reference']} (nats; best-of-N: log N − (N−1)/N)")
    ax.set_ylabel("mean gold score")
    ax.set_title(f"gold vs KL — {s['prompts']} prompts × {s['samples_per_prompt']} samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def _tensorboard(found: dict, out: Path, fig) -> None:
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(out / "tb", ignore_errors=True)  # a rerun does not mix its events with old ones
    distinct = f"distinct_{found['settings']['distinct_n']}"
    keys = ("proxy", "gold", "win_rate", "kl", "kl_measured", "length", "eos_rate", distinct)
    with SummaryWriter(log_dir=str(out / "tb")) as writer:
        for row in found["policies"]:
            for key in keys:
                writer.add_scalar(f"evaluate/{row['name']}/{key}", row[key], row["n"] or 0)
        writer.add_text("report/samples", samples_markdown(found))
        writer.add_text(
            "report/equal_kl", "\n\n".join(c["verdict"] for c in found["comparisons"]) or "-"
        )
        writer.add_figure("report/gold_vs_kl", fig, close=False)


def write(found: dict, results, session) -> Path:
    """Write report.json, report.md, gold_vs_kl.png and (unless disabled) tb/ under `out_dir`."""
    import matplotlib.pyplot as plt

    out = Path(session.cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(found, indent=2, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(markdown(found))
    fig = plot(found, out / "gold_vs_kl.png")
    if session.cfg.tensorboard:
        _tensorboard(found, out, fig)
    plt.close(fig)
    return out
