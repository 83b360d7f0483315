"""Float32 linear layers for the few rows of a KV-cached decode step on CPU, at memory speed.

    y[m, n] = Σ_k x[m, k] · W[n, k] + b[n]        x: Float[M, K], W: Float[N, K], M ≤ MAX_ROWS

A decode step multiplies every weight of the model with only M = batch rows, so it is bound by
streaming the weights from memory (2 · M FLOPs per 4 bytes). MKL's sgemm does not reach that
bound at M = 8: on a 2-core AMD EPYC VM it streams the PPO workload's weights at 6–14 GB/s while
a plain read (`Tensor.sum`) runs at 29–45 GB/s. The C++ kernel `csrc/decode_linear.cpp` loads
each weight row once, multiplies it into all M rows held in L1 and prefetches the rows ahead:
15–29 GB/s on the same machine, about 2× MKL, with the AVX-512 tile and with the AVX2 one
(`python -m benchmarks.bench_decode_linear`; the AVX2 build was timed on the same AVX-512 CPU).

API (same arguments as `torch.nn.functional.linear`):

* `decode_linear(x, weight, bias)` — the kernel (float32 CPU, any leading dims of `x`).
* `decode_linear_ref(x, weight, bias)` — the float64 torch reference (tests, benchmarks).
* `suits(x, weight, bias)` — whether a `linear` call is one the kernel takes: CPU float32,
  no autograd or autocast, at most `MAX_ROWS` rows, a contiguous weight of at least
  `MIN_WEIGHT_ELEMENTS` (smaller weights sit in cache, where MKL is as fast), a Float[N] bias.
* `fast_decode_linear()` — a context in which `torch.nn.functional.linear` (what every
  `nn.Linear` calls) runs the kernel for the calls it suits and torch's linear for the rest;
  `ppo.generation.generate` enters it for CPU models (`generation.fast_cpu_decode`).

The kernel is built once per machine with `torch.utils.cpp_extension` (-O3 -march=native
-fopenmp, ~30 s; cached under the torch extensions directory, keyed by the source, the flags, the
compiler's version, the CPU's instruction-set flags and the torch / Python versions, so a binary
is never run on a CPU it was not built for). A build lock left by a killed build is removed after
`STALE_LOCK_S`. If the kernel cannot be built (no C++ compiler or ninja) or would bring a second
OpenMP runtime into the process, one warning says why and torch's linear runs.
`RLHF_CPU_DECODE_LINEAR=0` turns the kernel off everywhere. The result differs from torch's in
summation order only (float32 rounding, ~1e-6 relative).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .dispatch import plain_float32_cpu

__all__ = [
    "MAX_ROWS",
    "MIN_WEIGHT_ELEMENTS",
    "ENV_VAR",
    "decode_linear",
    "decode_linear_ref",
    "suits",
    "extension",
    "fast_decode_linear",
]

MAX_ROWS = 16
"""Most rows of `x` the kernel takes (above that MKL's blocked GEMM is compute-efficient)."""
MIN_WEIGHT_ELEMENTS = 1 << 16
"""Smallest weight (N · K) the kernel takes: below 256 KiB the weight is cache-resident."""
ENV_VAR = "RLHF_CPU_DECODE_LINEAR"
"""Set to 0 to never use the kernel."""
STALE_LOCK_S = 600
"""A build lock older than this (seconds) belongs to a killed build and is removed."""

_SOURCE = Path(__file__).with_name("csrc") / "decode_linear.cpp"
_CFLAGS = ("-O3", "-march=native", "-fopenmp")  # OpenMP: at::parallel_for's threads
_LDFLAGS = ("-fopenmp",)  # libgomp.so.1: the one torch already loaded (same soname)


def decode_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x Float[..., K], weight Float[N, K], bias Float[N] → Float64[..., N] (the reference)."""
    out = x.double() @ weight.double().t()
    return out if bias is None else out + bias.double()


def decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x Float[..., K] (CPU float32), weight Float[N, K], bias Float[N] → Float[..., N].

    Raises RuntimeError when the kernel cannot be built (`extension()` is None)."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"{_SOURCE.name} could not be built or loaded here (see the warning)")
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
    out = ext.decode_linear(rows, weight.contiguous(), bias)  # [M, N]
    return out.view(*x.shape[:-1], weight.shape[0])


def suits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear(x, weight, bias)` is a call the kernel takes (see the module docstring)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not plain_float32_cpu(*tensors):
        return False  # tensor subclasses, other dtypes / devices, autocast: torch's linear
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the kernel has no backward
    if weight.dim() != 2 or not weight.is_contiguous():
        return False
    if x.dim() == 0 or x.shape[-1] != weight.shape[1] or x.shape[-1] == 0:
        return False
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        return False  # F.linear broadcasts other bias shapes; the kernel adds a Float[N]
    rows = x.numel() // x.shape[-1]
    return 1 <= rows <= MAX_ROWS and weight.numel() >= MIN_WEIGHT_ELEMENTS


def _enabled_by_env() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def _compiler_id() -> str:
    """First line of `c++ --version` ("" without a compiler): part of the cache key."""
    try:
        out = subprocess.run(["c++", "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.splitlines()[0] if out.stdout else ""


def _build_name() -> str:
    """Extension name keyed by the source, the flags, the compiler, the CPU's instruction-set
    flags and the torch / Python versions."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    digest = hashlib.sha256(_SOURCE.read_bytes())
    key = f"|{_CFLAGS}|{_LDFLAGS}|{_compiler_id()}|{flags}|{torch.__version__}|{sys.version[:6]}"
    digest.update(key.encode())
    return "rlhf_decode_linear_" + digest.hexdigest()[:12]


def _ninja_on_path() -> None:
    """Put the `ninja` PyPI package's binary on PATH when no ninja is there (cpp_extension
    calls `ninja` by name)."""
    if shutil.which("ninja"):
        return
    with contextlib.suppress(ImportError):
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _clear_stale_lock(folder: Path) -> None:
    """Remove a build lock older than `STALE_LOCK_S`: cpp_extension waits forever on the lock
    file of a build whose process was killed (a real build takes ~30 s)."""
    lock = folder / "lock"
    with contextlib.suppress(OSError):
        age = time.time() - lock.stat().st_mtime
        if age > STALE_LOCK_S:
            warnings.warn(
                f"removing a stale build lock of the CPU decode kernel ({lock}, {age:.0f} s old)",
                RuntimeWarning,
                stacklevel=3,
            )
            lock.unlink()


def _openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    names = ("libgomp", "libiomp", "libomp")
    with contextlib.suppress(OSError):
        lines = Path("/proc/self/maps").read_text().splitlines()
        return {line.split()[-1] for line in lines if any(n in line for n in names)}
    return set()


def _load():
    """Build (once per cache key) and import the kernel module."""
    from torch.utils import cpp_extension

    name = _build_name()
    _ninja_on_path()
    folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    _clear_stale_lock(folder)
    if not any(folder.glob("*.so")):
        print(
            f"rlhf_lightning: building the CPU decode kernel for this machine once "
            f"(~30 s; cached in {folder})",
            file=sys.stderr,
            flush=True,
        )
    runtimes = _openmp_runtimes()  # torch's, before ours is loaded
    module = cpp_extension.load(
        name,
        sources=[str(_SOURCE)],
        extra_cflags=list(_CFLAGS),  # copies: `load` appends to the lists it is given
        extra_ldflags=list(_LDFLAGS),
        verbose=False,
    )
    added = _openmp_runtimes() - runtimes
    if added and runtimes:  # our libgomp is not torch's: two thread pools would fight
        raise RuntimeError(
            f"it loaded a second OpenMP runtime ({', '.join(sorted(added))} beside "
            f"{', '.join(sorted(runtimes))})"
        )
    return module


@functools.cache
def extension():
    """The built kernel module, or None (with one warning) when it cannot be built or loaded."""
    try:
        return _load()
    except Exception as err:  # no compiler, no ninja, a failed build: torch's linear instead
        reason = " ".join(str(err).split())[:300]
        warnings.warn(
            f"the CPU decode kernel ({_SOURCE.name}) is not used, so decode steps run torch's "
            f"linear: {type(err).__name__}: {reason}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


@contextlib.contextmanager
def fast_decode_linear(enabled: bool = True) -> Iterator[None]:
    """Inside the context, `torch.nn.functional.linear` runs `decode_linear` for the calls it
    `suits` (and torch's linear for every other call). Not thread-safe: the swap is
    process-wide while the context is open. A no-op when `enabled` is false or
    `RLHF_CPU_DECODE_LINEAR=0`."""
    if not enabled or not _enabled_by_env():
        yield
        return
    original = torch.nn.functional.linear

    def linear(input, weight, bias=None):
        if suits(input, weight, bias) and extension() is not None:
            return decode_linear(input, weight, bias)
        return original(input, weight, bias)

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original
