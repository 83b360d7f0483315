"""Fixtures of the data-parallel tests: run `_driver.py` in subprocesses once per session.

Two driver runs feed every DDP test (measured on the shared 2-core CPU machine: 10–15 s and
15–30 s):
  - 1 process, float32 and float64 (`64-true`): sft, rm, ppo_fixed — the single-process results
    and the float64 reference the float32 errors are measured against;
  - 2 processes (`strategy="ddp"`, gloo), float32: sft, rm, ppo_fixed, ppo_resume.
Each run is bounded by a timeout and gets its own free MASTER_PORT.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DRIVER = Path(__file__).with_name("_driver.py")
RUN_TIMEOUT_S = 300  # a hung collective ends the run instead of the CI job


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_driver(out: Path, devices: int, precisions: str, scenarios: str) -> None:
    """Run the driver (and, under DDP, the rank processes Lightning launches from it); a port
    taken between `_free_port` and the rendezvous gets one retry on another port."""
    cmd = [sys.executable, str(DRIVER), str(out), str(devices), precisions, scenarios]
    for attempt in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        try:
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as err:
            tail = (err.stderr or b"")[-3000:]
            pytest.fail(f"{' '.join(cmd[1:])}: no result within {RUN_TIMEOUT_S} s\n{tail}")
        if done.returncode == 0:
            return
        if attempt == 0 and "address already in use" in done.stderr.lower():
            continue
        pytest.fail(f"{' '.join(cmd[1:])} exited {done.returncode}:\n{done.stderr[-4000:]}")


class Results:
    """The per-rank result files of the driver runs: `results.load("sft", 2, "32-true", 1)`."""

    def __init__(self, single: Path, ddp: Path):
        self.dirs = {1: single, 2: ddp}

    def load(self, name: str, devices: int, precision: str = "32-true", rank: int = 0) -> dict:
        scenario, _, part = name.partition(":")
        stem = f"{scenario}_w{devices}_{precision}" + (f"_{part}" if part else "")
        path = self.dirs[devices] / f"{stem}_rank{rank}.pt"
        return torch.load(path, weights_only=False)


@pytest.fixture(scope="session")
def ddp_results(tmp_path_factory) -> Results:
    single = tmp_path_factory.mktemp("ddp_single")
    ddp = tmp_path_factory.mktemp("ddp_two_ranks")
    run_driver(single, 1, "32-true,64-true", "sft,rm,ppo_fixed")
    run_driver(ddp, 2, "32-true", "sft,rm,ppo_fixed,ppo_resume")
    return Results(single, ddp)
