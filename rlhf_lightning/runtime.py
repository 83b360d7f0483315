"""Process-level runtime settings: glibc's allocator keeps freed memory for reuse.

Training allocates and frees the same large host buffers at every step (activations, gradients,
the [V, H] embedding gradient). glibc serves every allocation above its mmap threshold (dynamic,
at most 32 MiB) with a fresh `mmap` and unmaps it on `free`, and returns free memory at the top of
its heap to the kernel beyond the trim threshold, so the next step faults every page in again and
the kernel zeroes it. On a 2-core VM that costs about a third of the process's system time:
`torch.zeros(49152, 576)` takes 34 ms from fresh pages, 21 ms from retained memory (3.5 ms to
re-zero the same buffer), and one `bench_ppo_step` run (3 iterations) had 3.1 M minor page
faults and 17.8 s system CPU with glibc's defaults, 1.8 M and 10.9 s with the settings below, for
the same peak RSS (7.45 vs 7.42 GB) — benchmarks/TRL.md §2.

`retain_freed_memory()` sets `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` to 1 GiB with `mallopt`
(the same as `MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824`; where an older
glibc refuses an mmap threshold above 32 MiB, 32 MiB is used): buffers up to 1 GiB come from the
heap and at most 1 GiB of free memory is kept above the heap's top. The price: RSS does not
shrink between steps, and it can exceed the peak of glibc's defaults by up to that 1 GiB, as the
heap places new buffers in its kept free memory (measured: allocating and freeing one 108 MiB
tensor 60 times peaks at 1084 MiB vs 328 MiB, reached after 7 cycles and flat after; the PPO
benchmark 7.42 vs 7.45 GB and the quickstart 769 vs 759 MB, with and without). It changes
nothing when: the C library is not glibc; `RLHF_CPU_ALLOCATOR=system` (glibc's defaults); or
the user set `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or any `glibc.malloc.*` tunable
in `GLIBC_TUNABLES` — theirs win. The `rlhf` command and every stage module's `setup` call it; it
is idempotent.

References: glibc manual, "Memory Allocation Tunables" and mallopt(3).
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["RETAIN_BYTES", "allocator_mode", "retain_freed_memory"]

RETAIN_BYTES = 1 << 30
"""The mmap and trim thresholds `retain_freed_memory` sets (1 GiB)."""

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_applied = False


def allocator_mode() -> str:
    """What `retain_freed_memory` does in this process: "retain", or why it leaves glibc alone —
    "system" (`RLHF_CPU_ALLOCATOR=system`), "user" (the user's malloc variables), "not-glibc"."""
    choice = os.environ.get("RLHF_CPU_ALLOCATOR", "retain").strip().lower()
    if choice not in ("retain", "system"):
        raise ValueError(f"RLHF_CPU_ALLOCATOR={choice!r}: expected 'retain' (default) or 'system'")
    if choice == "system":
        return "system"
    if any(name in os.environ for name in _USER_VARIABLES):
        return "user"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "user"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not-glibc"
    return "retain"


def retain_freed_memory(libc=None) -> bool:
    """Make glibc keep freed memory (see the module docstring); True when the thresholds are set
    (now or by an earlier call). `libc`: the C library handle (default: glibc's `libc.so.6`)."""
    global _applied
    if _applied:
        return True
    if allocator_mode() != "retain":
        return False
    try:
        libc = libc or ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # the mmap threshold first: older glibc refuses values above HEAP_MAX_SIZE / 2 (32 MiB on
    # 64-bit), its own largest dynamic value, which is then the best it takes. Setting the trim
    # threshold alone would freeze the mmap threshold where it is (128 KiB at start): worse than
    # glibc's defaults.
    if not any(libc.mallopt(_M_MMAP_THRESHOLD, size) == 1 for size in (RETAIN_BYTES, 32 << 20)):
        return False
    _applied = libc.mallopt(_M_TRIM_THRESHOLD, RETAIN_BYTES) == 1
    return _applied
