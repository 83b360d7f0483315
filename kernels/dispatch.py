"""Backend choice for the token-statistics kernels.

``"triton"`` runs the fused Triton kernels (CUDA tensors, or CPU tensors when the Triton
interpreter is on: ``TRITON_INTERPRET=1`` set before ``import triton``); ``"chunked"``
(alias ``"torch"``) runs the chunked-torch implementation. ``"auto"`` picks triton for CUDA
tensors when Triton imports, chunked otherwise. Precedence: the ``backend=`` argument, then
the ``RLHF_KERNEL_BACKEND`` environment variable, then ``"auto"``.

``cpu_info`` reads the CPU's vendor and instruction-set flags (the CPU linear backend's choice,
the bf16 recipe, the benchmarks' records). ``plain_float32_cpu`` is the first test of the CPU linear replacements (``cpu_decode``,
``onednn_linear``): plain float32 CPU tensors outside CPU autocast.

``without_autocast`` wraps the autograd functions' forward and backward: the kernels pick their
own precision (float32 accumulation), and an enclosing ``torch.autocast`` (Lightning's
``bf16-mixed``/``16-mixed``) would otherwise run their internal matmuls and dot products in 16-bit.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

ENV_VAR = "RLHF_KERNEL_BACKEND"
_ALIASES = {"auto": "auto", "triton": "triton", "torch": "chunked", "chunked": "chunked"}


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works (GPU build, or the interpreter on CPU)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def interpreter_on() -> bool:
    """True when the Triton interpreter (CPU execution of kernels) is requested."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """Return ``"triton"`` or ``"chunked"`` for tensor ``x``; raise ValueError for bad names."""
    raw = backend if backend is not None else os.environ.get(ENV_VAR) or "auto"
    name = _ALIASES.get(str(raw).strip().lower())
    if name is None:
        src = "backend=" if backend is not None else f"environment variable {ENV_VAR}="
        raise ValueError(
            f"{src}{raw!r} is not a kernel backend; choose one of 'auto', 'triton', 'torch'/'chunked'"
        )
    if name == "auto":
        return "triton" if x.is_cuda and triton_available() else "chunked"
    if name == "triton":
        if not triton_available():
            raise ValueError("backend='triton' requested but triton cannot be imported")
        if not x.is_cuda and not interpreter_on():
            raise ValueError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing triton"
            )
    return name


def without_autocast(fn):
    """Decorator: run ``fn`` with autocast switched off on every device where it is on."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        devices = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        if not devices:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device in devices:
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


def plain_float32_cpu(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is a plain float32 CPU tensor (not a subclass such as compile's fake
    tensors or DTensor) and CPU autocast is off: what a CPU linear replacement may take."""
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return not torch.is_autocast_enabled("cpu")


def cpu_info(path: str | Path = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(vendor_id, instruction-set flags) of the first CPU in `path` (the "flags" line, or
    "Features" on Arm); ("", frozenset()) where it cannot be read."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "", frozenset()
    vendor, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key in ("flags", "Features") and flags is None:
            flags = frozenset(value.split())
    return vendor, flags or frozenset()
