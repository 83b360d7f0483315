"""glibc allocator settings (`rlhf_lightning.runtime`): when they apply, that large buffers then
come from the heap (kept across steps) instead of fresh mappings, older glibc, and who calls them."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from rlhf_lightning import runtime

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
GLIBC_VERSION = tuple(int(x) for x in platform.libc_ver()[1].split(".")[:2]) if GLIBC else ()

_MMAPPED = """
import ctypes, json, torch
from rlhf_lightning.runtime import retain_freed_memory


class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = retain_freed_memory()
before = libc.mallinfo2().hblkhd  # bytes in mmapped blocks
x = torch.empty(64 << 18)  # 64 MiB: above glibc's largest dynamic mmap threshold
grew = libc.mallinfo2().hblkhd - before
print(json.dumps({"applied": applied, "mmapped": grew}))
"""


def _mmapped(**env) -> dict:
    """In a fresh interpreter: whether the setting applied and how many bytes of a 64 MiB tensor
    glibc served with mmap (the mechanism, independent of page size and transparent huge pages)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "RLHF_CPU"))}
    clean.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", _MMAPPED],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC or GLIBC_VERSION < (2, 33), reason="glibc >= 2.33 (mallinfo2) only")
def test_large_buffers_come_from_the_heap_instead_of_mmap():
    default = _mmapped(RLHF_CPU_ALLOCATOR="system")
    tuned = _mmapped()
    assert not default["applied"] and tuned["applied"]
    assert default["mmapped"] >= 64 << 20  # glibc's defaults: a fresh mapping, unmapped on free
    assert tuned["mmapped"] == 0  # retained: heap memory, kept for the next step


class _FakeLibc:
    """`mallopt` that refuses mmap thresholds above `cap` (older glibc) and records the calls."""

    def __init__(self, cap: int):
        self.cap, self.calls = cap, []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return int(param != runtime._M_MMAP_THRESHOLD or value <= self.cap)


def test_older_glibc_gets_its_largest_mmap_threshold(monkeypatch):
    monkeypatch.setattr(runtime, "_applied", False)
    monkeypatch.setattr(runtime, "allocator_mode", lambda: "retain")
    libc = _FakeLibc(cap=32 << 20)
    assert runtime.retain_freed_memory(libc)
    mmap, trim = runtime._M_MMAP_THRESHOLD, runtime._M_TRIM_THRESHOLD
    assert libc.calls == [(mmap, 1 << 30), (mmap, 32 << 20), (trim, 1 << 30)]


def test_trim_threshold_is_not_set_when_the_mmap_threshold_is_refused(monkeypatch):
    # the trim threshold alone would freeze glibc's mmap threshold at 128 KiB
    monkeypatch.setattr(runtime, "_applied", False)
    monkeypatch.setattr(runtime, "allocator_mode", lambda: "retain")
    libc = _FakeLibc(cap=0)
    assert not runtime.retain_freed_memory(libc)
    assert all(param == runtime._M_MMAP_THRESHOLD for param, _ in libc.calls)


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
