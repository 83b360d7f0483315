"""glibc allocator settings (`rlhf_lightning.runtime`): when they apply, that they keep freed
memory mapped (page faults of repeated large allocations), and who calls them."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from rlhf_lightning import runtime

CYCLES = 24
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

_FAULTS = """
import json, resource, sys, torch
from rlhf_lightning.runtime import retain_freed_memory
applied = retain_freed_memory()
torch.zeros(64 << 18).sum()  # 64 MiB once, so the next allocations can reuse it
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(CYCLES):
    torch.zeros(64 << 18).sum()  # 64 MiB: above glibc's largest dynamic mmap threshold
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"applied": applied, "faults": after - before}))
"""


def _faults(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "RLHF_CPU"))}
    clean.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", f"CYCLES = {CYCLES}\n{_FAULTS}"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_retained_memory_is_reused_without_page_faults():
    default = _faults(RLHF_CPU_ALLOCATOR="system")
    tuned = _faults()
    assert not default["applied"] and tuned["applied"]
    pages = CYCLES * (64 << 20) // 4096  # every allocation faulted in afresh (4 KiB pages)
    assert default["faults"] > pages // 2  # glibc's defaults: a fresh mmap each time
    # retained: the same heap memory again once the heap has settled (measured on the 2-core VM:
    # the first 1-5 cycles still fault, then none; glibc's defaults fault every cycle)
    assert tuned["faults"] < default["faults"] // 2


@pytest.mark.parametrize(
    ("env", "mode"),
    [
        ({"RLHF_CPU_ALLOCATOR": "system"}, "system"),
        ({"RLHF_CPU_ALLOCATOR": " System "}, "system"),
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, "user"),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "user"),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "user"),
    ],
)
def test_mode_leaves_glibc_alone_when_asked_or_user_tuned(monkeypatch, env, mode):
    for name in ("RLHF_CPU_ALLOCATOR", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert runtime.allocator_mode() == mode


def test_mode_default_is_retain_on_glibc(monkeypatch):
    for name in ("RLHF_CPU_ALLOCATOR", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")  # not a malloc tunable
    assert runtime.allocator_mode() == ("retain" if GLIBC else "not-glibc")


def test_bad_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv("RLHF_CPU_ALLOCATOR", "jemalloc")
    with pytest.raises(ValueError, match="RLHF_CPU_ALLOCATOR='jemalloc'.*'retain'"):
        runtime.allocator_mode()


def test_bad_mode_is_one_line_from_the_cli(monkeypatch, capsys):
    from rlhf_lightning.cli import main

    monkeypatch.setattr(runtime, "_applied", False)
    monkeypatch.setenv("RLHF_CPU_ALLOCATOR", "jemalloc")
    assert main(["fit", "--help"]) == 2
    assert "rlhf: error: RLHF_CPU_ALLOCATOR='jemalloc'" in capsys.readouterr().err


def test_stage_module_setup_applies_it(monkeypatch):
    from rlhf_lightning.modules.base import StageModule

    calls = []
    monkeypatch.setattr("rlhf_lightning.modules.base.retain_freed_memory", lambda: calls.append(1))
    StageModule().setup("fit")
    assert calls == [1]
