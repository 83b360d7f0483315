"""Float32 CPU linear layers on oneDNN instead of MKL's sgemm (forward and input gradient).

    y  = x Wᵀ + b        x: Float[M, K], W: Float[N, K], b: Float[N]
    dx = dy W            (oneDNN, W's transposed view)
    dW = dyᵀ x           (torch.mm: MKL, faster than oneDNN for this layout)
    db = Σ_rows dy

torch runs a float32 `linear` on CPU as MKL's sgemm. On a 2-core AMD EPYC (Zen 4, AVX-512) VM,
oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, the op inductor's CPU linear fusion
emits, shipped with every torch wheel) is faster at the shapes of a SmolLM2-sized model (`python
-m benchmarks.bench_onednn_linear`, benchmarks/TRL.md §2 "Session 8"): y at 628 rows 133–184 →
180–191 GFLOP/s, the LM head at 128 rows 100 → 191; dx 159–176 → 189–208; one policy + critic
forward + backward 6.51 → 6.02 s (8.21 → 7.17 s in a slower VM phase); in the PPO iteration a
paired A/B measured ≈ 6–10 % less time.
MKL stays faster for dW here, so dW stays on it. With the AVX2 instruction set only
(`ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2` on the same CPU) oneDNN wins only at the
LM head, and on Intel CPUs MKL is the vendor's own library (not measured here): `auto` therefore
picks oneDNN on AMD CPUs with AVX-512 only. Small calls (few rows, small weights such as LoRA
factors) stay on torch, where oneDNN's per-call overhead loses.

Numerics: oneDNN accumulates each output along K in one chain, MKL in blocks, so its float32
error against a float64 reference is 1.5× MKL's at K = 576 and 2.06× at K = 1536 (relative RMS
3.9e-7 and 5.2e-7), far inside float32's √K·u error model; the tests bound it at 2.5× MKL's.
Results differ from torch's linear in rounding only (~1e-6 relative).

API (same arguments as `torch.nn.functional.linear`):

* `onednn_linear(x, weight, bias)` — the op, with autograd: first-order gradients only (no
  double backward) and no `torch.func` transforms; its output is not a view (in-place use works
  as on torch's linear).
* `onednn_linear_ref(x, weight, bias)` — the float64 torch reference (tests, benchmarks).
* `suits(x, weight, bias)` — whether a call is one it takes: CPU float32 (no autocast, not under
  `torch.compile`), a contiguous 2-D weight of at least `MIN_WEIGHT_ELEMENTS`, at least
  `MIN_ROWS` rows (`MIN_ROWS_LARGE` for weights of `LARGE_WEIGHT_ELEMENTS`), a contiguous
  Float[N] bias (oneDNN reads a bias as dense).
* `backend()` — "onednn" or "torch" for this process, from `RLHF_CPU_MATMUL` (`auto`, the
  default: oneDNN on AMD CPUs with AVX-512, unless `ONEDNN_MAX_CPU_ISA` limits oneDNN below
  AVX-512 or `torch.backends.mkldnn.enabled` is false; `onednn`; `torch`).
* `onednn_linears(enabled)` — a context in which `torch.nn.functional.linear` (what every
  `nn.Linear` calls) runs `onednn_linear` for the calls it suits and the previous linear for the
  rest; process-wide while open (not thread-safe). `OneDNNLinearCallback` opens it for a
  Trainer's run on CPU (every stage module adds it). While it is open (`active()`), the fused
  LM head of `kernels.linear` (`linear_token_stats`) computes its float32 CPU logit tiles and
  their input gradient with `matmul_nt` too.

References: oneDNN developer guide, "MatMul" and "Inner Product" primitives; PyTorch
`torch/_inductor/fx_passes/mkldnn_fusion.py` (the same op as a linear).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator

import torch

from .dispatch import cpu_info, plain_float32_cpu

__all__ = [
    "ENV_VAR",
    "LARGE_WEIGHT_ELEMENTS",
    "MIN_ROWS",
    "MIN_ROWS_LARGE",
    "MIN_WEIGHT_ELEMENTS",
    "active",
    "backend",
    "matmul_nt",
    "onednn_linear",
    "onednn_linear_ref",
    "onednn_linears",
    "suits",
]

ENV_VAR = "RLHF_CPU_MATMUL"
"""`auto` (default), `onednn` or `torch`: which library runs float32 CPU linear layers."""
MIN_WEIGHT_ELEMENTS = 1 << 16
"""Smallest weight (N · K) taken: below it oneDNN's per-call overhead loses to MKL at any row
count measured, and LoRA factors stay on torch."""
MIN_ROWS = 128
"""Fewest rows of x taken: at 16–64 rows oneDNN lost on 128×576, 192×576 and 256×256 weights."""
LARGE_WEIGHT_ELEMENTS = 1 << 19
"""Weights this large (gate/up 1536×576, LM-head tiles) are taken from `MIN_ROWS_LARGE` rows."""
MIN_ROWS_LARGE = 16
"""Fewest rows for a large weight (decode steps' ≤ 16 rows run `kernels.cpu_decode` or torch)."""
BACKENDS = ("auto", "onednn", "torch")


def onednn_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x Float[..., K], weight Float[N, K], bias Float[N] → Float64[..., N] (the reference)."""
    out = x.double() @ weight.double().t()
    return out if bias is None else out + bias.double()


def matmul_nt(rows: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """rows Float[M, K] · weight Float[N, K]ᵀ (+ bias Float[N]) on oneDNN → a new Float[M, N].

    `rows` must be contiguous and `weight` contiguous or the transposed view of a contiguous
    matrix: other strides (e.g. a column slice) fall to a slow oneDNN path (measured 1000×)."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")


_active = 0  # open `onednn_linears` contexts


def active() -> bool:
    """Whether an `onednn_linears` context is open (the fused LM-head tiles of `kernels.linear`
    follow it)."""
    return _active > 0


def _as_output(out: torch.Tensor, x_shape, n: int) -> torch.Tensor:
    """out Float[M, N] as Float[..., N] of `x_shape` — not a view (as torch's linear output is
    not), so that callers may modify it in place under autograd."""
    if len(x_shape) == 2:
        return out
    return torch.ops.aten._unsafe_view(out, (*x_shape[:-1], n))


class _OneDNNLinear(torch.autograd.Function):
    """y = x Wᵀ + b with dx on oneDNN and dW on torch.mm (see the module docstring). Saves x only
    when W needs a gradient and W only when x does, as torch's linear does."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(
            x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None
        )
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
        return _as_output(matmul_nt(rows, weight, bias), x.shape, weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()  # [M, N]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # dx = dy W: W's transposed view is oneDNN's [K, N] weight
            grad_x = matmul_nt(grad, weight.t(), None).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = grad.t().mm(x.reshape(-1, x.shape[-1]))  # [N, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x Float[..., K] (CPU float32), weight Float[N, K], bias Float[N] (contiguous) →
    Float[..., N]."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _OneDNNLinear.apply(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return _as_output(matmul_nt(rows, weight, bias), x.shape, weight.shape[0])


def suits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear(x, weight, bias)` is a call `onednn_linear` takes (module docstring)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not plain_float32_cpu(*tensors) or torch.compiler.is_compiling():
        return False  # tensor subclasses, other dtypes / devices, autocast, compiled graphs
    if weight.dim() != 2 or not weight.is_contiguous() or weight.numel() < MIN_WEIGHT_ELEMENTS:
        return False
    if x.dim() < 2 or x.shape[-1] != weight.shape[1] or x.shape[-1] == 0:
        return False
    rows = x.numel() // x.shape[-1]
    if rows < (MIN_ROWS_LARGE if weight.numel() >= LARGE_WEIGHT_ELEMENTS else MIN_ROWS):
        return False
    if bias is None:
        return True  # oneDNN reads a bias as dense: strided / expanded ones stay with torch
    return bias.dim() == 1 and bias.shape[0] == weight.shape[0] and bias.is_contiguous()


_BELOW_AVX512 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")  # ONEDNN_MAX_CPU_ISA values


@functools.cache
def _auto_backend() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "torch"
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in _BELOW_AVX512:
        return "torch"  # oneDNN limited to the code paths where it lost to MKL
    vendor, flags = cpu_info()
    return "onednn" if vendor == "AuthenticAMD" and "avx512f" in flags else "torch"


def backend() -> str:
    """The library for this process, "onednn" or "torch": `RLHF_CPU_MATMUL` (`auto` resolved);
    ValueError for another value. "torch" wherever torch was built without oneDNN or it is
    switched off (`torch.backends.mkldnn.enabled = False`)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r}: use one of {', '.join(BACKENDS)}")
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return "torch"
    return _auto_backend() if value == "auto" else value


@contextlib.contextmanager
def onednn_linears(enabled: bool = True) -> Iterator[None]:
    """Inside the context, `torch.nn.functional.linear` runs `onednn_linear` for the calls it
    `suits` and the previous linear for the rest (a no-op when not `enabled`)."""
    if not enabled:
        yield
        return
    previous = torch.nn.functional.linear

    def linear(input, weight, bias=None):
        if suits(input, weight, bias):
            return onednn_linear(input, weight, bias)
        return previous(input, weight, bias)

    global _active
    torch.nn.functional.linear = linear
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        torch.nn.functional.linear = previous
