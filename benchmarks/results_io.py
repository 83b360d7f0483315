"""Result files of the benchmarks: git revision, UTC timestamp, rows appended to a CSV.

One implementation for `bench_ppo_step.py`, `bench_reward_vs_trl.py` and `run.py`, whose rows
in `benchmarks/results/*.csv` record which revision (and whether the tree was edited) they ran.
"""

from __future__ import annotations

import csv
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_sha(root: Path = ROOT) -> str:
    """Short HEAD sha of the repository at `root`, with `-dirty` when tracked files are edited.

    "unknown" when git is missing or `root` is not a checkout (untracked files do not count).
    """

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, check=False
            )
        except OSError:
            return ""
        return done.stdout

    sha = git("rev-parse", "--short", "HEAD").strip()
    if not sha:
        return "unknown"
    return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no").strip() else "")


def utc_timestamp() -> str:
    """Now, as `YYYY-MM-DDTHH:MM:SSZ` (UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def append_csv(path: Path, rows: Iterable[dict], fields: Sequence[str]) -> Path:
    """Append `rows` to the CSV at `path` in the column order `fields`; returns `path`.

    A new file (and its folder) gets the header first. A field missing from a row is written
    empty; keys that are not in `fields` are left out.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path
