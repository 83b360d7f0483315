"""The TRL interpreter of the side-by-side benchmarks: found, or created from documented commands.

TRL 1.12 (the last release with `PPOTrainer`) lives in its own virtual environment so that it
never changes the project's dependencies (benchmarks/TRL.md). The benchmarks look for it in
this order:

1. `--trl-python PATH` on the command line;
2. the environment variable `RLHF_TRL_PYTHON`;
3. `<repo>/.venv-trl/bin/python`.

Create it (the pip commands of TRL.md, in a venv of the project interpreter's Python version):

    .venv/bin/python -m benchmarks.trl_env --setup      # or --setup-trl on a benchmark command

Without an interpreter at the chosen path, the benchmarks exit with one line giving that command.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV_VAR = "RLHF_TRL_PYTHON"
DEFAULT_VENV = ROOT / ".venv-trl"
SETUP_COMMAND = ".venv/bin/python -m benchmarks.trl_env --setup"
# pip requirements, installed in this order: torch first, so that trl does not pull a CUDA build
REQUIREMENTS = ("torch==2.13.0", "trl==1.12.0")


def find_trl_python(explicit: str | None = None) -> tuple[Path, str]:
    """`(interpreter path, where it came from)` by the order above; the path may not exist."""
    if explicit:
        return Path(explicit), "--trl-python"
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]), ENV_VAR
    return DEFAULT_VENV / "bin" / "python", "default"


def setup_commands(venv: Path) -> list[list[str]]:
    """The commands that create `venv` with TRL 1.12 (those of benchmarks/TRL.md)."""
    pip = str(venv / "bin" / "pip")
    return [[sys.executable, "-m", "venv", str(venv)]] + [[pip, "install", r] for r in REQUIREMENTS]


def create_trl_venv(python: Path) -> Path:
    """Run `setup_commands` for the venv of `python` (`<venv>/bin/python`); returns `python`."""
    if python.parent.name != "bin":
        raise SystemExit(f"--setup-trl: {python} is not <venv>/bin/python; cannot create its venv")
    for cmd in setup_commands(python.parents[1]):
        print("[trl-setup] " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return python


def resolve_trl_python(explicit: str | None = None, *, setup: bool = False) -> str:
    """The TRL interpreter to run; with `setup`, creates a missing one first.

    Raises SystemExit with one line (where the path came from and the setup command) when
    there is none and `setup` is off.
    """
    python, source = find_trl_python(explicit)
    if python.exists():
        return str(python)
    if setup:
        return str(create_trl_venv(python))
    origin = {"default": "default path", ENV_VAR: f"${ENV_VAR}"}.get(source, source)
    command = SETUP_COMMAND + (f" --trl-python {python}" if source == "--trl-python" else "")
    raise SystemExit(
        f"TRL interpreter not found: {python} ({origin}); create it with `{command}` "
        f"(benchmarks/TRL.md), or pass --trl-python PATH / set {ENV_VAR}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--trl-python` and `--setup-trl`, as every TRL-comparing benchmark takes them."""
    parser.add_argument(
        "--trl-python",
        default=None,
        help=f"interpreter with trl==1.12.0 (default: ${ENV_VAR}, else .venv-trl/bin/python)",
    )
    parser.add_argument(
        "--setup-trl",
        action="store_true",
        help="create the TRL venv first when it is missing (benchmarks/TRL.md)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trl-python", default=None, help="interpreter to find or create")
    parser.add_argument("--setup", action="store_true", help="create the venv when it is missing")
    parser.add_argument("--print-commands", action="store_true", help="only print the commands")
    ns = parser.parse_args(argv)
    python, source = find_trl_python(ns.trl_python)
    if ns.print_commands:
        print("\n".join(" ".join(cmd) for cmd in setup_commands(python.parents[1])))
        return 0
    print(f"{resolve_trl_python(ns.trl_python, setup=ns.setup)} ({source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
