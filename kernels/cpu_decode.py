"""Float32 linear layers for the few rows of a KV-cached decode step on CPU, at memory speed.

    y[m, n] = Σ_k x[m, k] · W[n, k] + b[n]        x: Float[M, K], W: Float[N, K], M ≤ MAX_ROWS

A decode step multiplies every weight of the model with only M = batch rows, so it is bound by
streaming the weights from memory (2 · M FLOPs per 4 bytes). MKL's sgemm does not reach that
bound at M = 8: on a 2-core AMD EPYC VM it streams a [2304, 576] weight at 9 GB/s while a plain
read (`Tensor.sum`) runs at 30–40 GB/s. The C++ kernel `csrc/decode_linear.cpp` loads each
weight row once, multiplies it into all M rows held in L1 and prefetches the rows ahead:
18–20 GB/s on the same machine (`python -m benchmarks.bench_decode_linear`).

API (same arguments as `torch.nn.functional.linear`):

* `decode_linear(x, weight, bias)` — the kernel (float32 CPU, any leading dims of `x`).
* `decode_linear_ref(x, weight, bias)` — the float64 torch reference (tests, benchmarks).
* `suits(x, weight, bias)` — whether a `linear` call is one the kernel takes: CPU float32,
  no autograd or autocast, at most `MAX_ROWS` rows, a contiguous weight of at least
  `MIN_WEIGHT_ELEMENTS` (smaller weights sit in cache, where MKL is as fast).
* `fast_decode_linear()` — a context in which `torch.nn.functional.linear` (what every
  `nn.Linear` calls) runs the kernel for the calls it suits and torch's linear for the rest;
  `ppo.generation.generate` enters it (`generation.fast_cpu_decode`).

The kernel is built once per machine and torch version with `torch.utils.cpp_extension`
(-O3 -march=native -fopenmp, ~30 s; cached under the torch extensions directory, keyed by the source,
the CPU's instruction-set flags and torch's version, so a binary is never run on a CPU it was
not built for). If it cannot be built (no C++ compiler or ninja), one warning says why and
torch's linear runs. `RLHF_CPU_DECODE_LINEAR=0` turns the kernel off everywhere.
The result differs from torch's in summation order only (float32 rounding, ~1e-6 relative).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

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
        raise RuntimeError(f"{_SOURCE.name} could not be built on this machine (see the warning)")
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
    out = ext.decode_linear(rows, weight.contiguous(), bias)  # [M, N]
    return out.view(*x.shape[:-1], weight.shape[0])


def suits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear(x, weight, bias)` is a call the kernel takes (see the module docstring)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(type(t) not in (torch.Tensor, nn.Parameter) for t in tensors):
        return False  # tensor subclasses (compile's fake tensors, DTensor) keep torch's linear
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the kernel has no backward
    if torch.is_autocast_enabled("cpu") or weight.dim() != 2 or not weight.is_contiguous():
        return False
    if x.dim() == 0 or x.shape[-1] != weight.shape[1] or x.shape[-1] == 0:
        return False
    rows = x.numel() // x.shape[-1]
    return 1 <= rows <= MAX_ROWS and weight.numel() >= MIN_WEIGHT_ELEMENTS


def _enabled_by_env() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def _build_name() -> str:
    """Extension name keyed by the source, the CPU's flags and torch's version."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    digest = hashlib.sha256(_SOURCE.read_bytes())
    digest.update(
        f"|{_CFLAGS}|{_LDFLAGS}|{flags}|{torch.__version__}|{sys.version_info[:2]}".encode()
    )
    return "rlhf_decode_linear_" + digest.hexdigest()[:12]


def _ninja_on_path() -> None:
    """Put the `ninja` PyPI package's binary on PATH when no ninja is there (cpp_extension
    calls `ninja` by name)."""
    if shutil.which("ninja"):
        return
    with contextlib.suppress(ImportError):
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def extension():
    """The built kernel module, or None (with one warning) when it cannot be built."""
    from torch.utils import cpp_extension

    name = _build_name()
    try:
        _ninja_on_path()
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not any(folder.glob("*.so")):
            print(
                f"rlhf_lightning: building the CPU decode kernel for this machine once "
                f"(~30 s; cached in {folder})",
                file=sys.stderr,
                flush=True,
            )
        return cpp_extension.load(
            name,
            sources=[str(_SOURCE)],
            extra_cflags=list(_CFLAGS),  # copies: `load` appends to the lists it is given
            extra_ldflags=list(_LDFLAGS),
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, a failed build: torch's linear instead
        reason = " ".join(str(err).split())[:300]
        warnings.warn(
            f"the CPU decode kernel ({_SOURCE.name}) could not be built, so decode steps use "
            f"torch's linear: {type(err).__name__}: {reason}",
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
