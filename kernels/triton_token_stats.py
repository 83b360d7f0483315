"""Triton kernels: log π(label), entropy and exact KL(π‖π_ref) in one pass over the vocabulary.

One program per valid row (masked rows are never launched: they output 0 and get gradient 0).
With z the raw logits of a row, T the temperature, m = max z, and a = (z - m)/T:

Forward (online over vocabulary tiles, all in float32). Keeping m, s = Σ e^a and
t = Σ e^a·a, a new tile with max m' rescales by c = e^{(m - m')/T} and δ = (m - m')/T:
    s ← c·s + Σ_tile e^a,     t ← c·(t + δ·s) + Σ_tile e^a·a.
At the end log s gives lse = m/T + log s and
    log π(y) = a_y - log s,        H = -Σ p log p = log s - t/s.
With a reference row (max m_q, a_q = (z_q - m_q)/T, s_q = Σ e^{a_q}) we also keep
r = Σ e^a·a_q, updated as r ← c·(r + δ_q·s) + Σ_tile e^a·a_q with δ_q = (m_q - m_q')/T, so
    KL(p‖q) = Σ p (log p - log q) = (t - r)/s - log s + log s_q.
Every accumulated term is in the shifted frame, so |z| ≈ 1e4 keeps full precision; e = 0
entries (z = -inf, or tile padding) contribute 0 through ``where`` (0·-inf would be NaN).

Backward: with p = softmax(z/T) and per-row upstream gradients g_lp, g_H, g_KL,
    ∂log p_y/∂z_v = (1/T)(δ_vy - p_v)
    ∂H/∂z_v       = -(1/T) p_v (log p_v + H)
    ∂KL/∂z_v      = (1/T) p_v (log p_v - log q_v - KL)
    ∂KL/∂z_q,v    = (1/T)(q_v - p_v)
so one pass recomputes log p (from the saved m, log s) and writes
    dz = (1/T)[g_lp δ_vy] + p ⊙ (α + β log p + γ log q),
    α = -(g_lp + g_H H + g_KL KL)/T,  β = -(g_H - g_KL)/T,  γ = -g_KL/T.
Bytes per row: forward reads z (and z_q) once; backward reads z (and z_q) once and writes
dz (and dz_q) once — the minimum for these outputs.

Compiled variants: input dtype × the HAS_* / REF_GRAD flags × ALIGNED × (BLOCK_V, num_warps),
and nothing else (``_jit_closed``); ``python -m rlhf_lightning.kernels.aot`` compiles all of them
for sm_80 / sm_90 without a GPU (docs/kernels.md, "Compiled for sm_80 / sm_90").

References: Milakov & Gimelshein, "Online normalizer calculation for softmax" (2018);
Triton tutorial "Fused Softmax" for the per-row program layout.
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from .dispatch import interpreter_on, without_autocast

#: Vocabulary tile override (tests set it to exercise several tiles); None = heuristic.
#: Test-only: on a GPU it leaves the closed set of compiled variants (docs/kernels.md).
BLOCK_V_OVERRIDE: int | None = None
#: GPU vocabulary tiles: the first tile ≥ V, else the last one (looped over the row).
GPU_BLOCKS_V = (1024, 4096)
_INTERPRETER_MAX_BLOCK_V = 8192
#: V and row strides that are multiples of this (elements) and tile addresses aligned to it
#: (bytes) select the ``ALIGNED`` variant (16-byte vector loads / stores): the JIT's own rule.
ALIGNMENT = 16
F32 = torch.float32


def _jit_closed(fn):
    """``triton.jit`` that specialises on dtypes and constexprs only, never on runtime values.

    By default the JIT compiles separate variants for ints equal to 1 or divisible by 16 and
    for 16-byte-aligned pointers; here every runtime argument opts out, so the variants a
    launcher can produce are exactly its dtypes × constexprs × launch options, and
    ``python -m rlhf_lightning.kernels.aot`` compiles all of them. Alignment comes back as the
    explicit ``ALIGNED`` constexpr.
    """
    params = inspect.signature(fn).parameters
    runtime = [name for name, p in params.items() if "constexpr" not in str(p.annotation)]
    return triton.jit(fn, do_not_specialize=runtime, do_not_specialize_on_alignment=runtime)


@triton.jit
def _vocab_hint(V, ALIGNED: tl.constexpr):
    """``V`` unchanged; with ALIGNED (V % 16 == 0) the compiler also sees it is a multiple of 16."""
    if ALIGNED:
        V = (V // 16) * 16
    return V


@triton.jit
def _tile_ptrs(row_ptr, offs, ALIGNED: tl.constexpr):
    """``row_ptr + offs``; with ALIGNED each tile's first address is 16-byte aligned."""
    ptrs = row_ptr + offs
    if ALIGNED:
        ptrs = tl.multiple_of(ptrs, 16)
    return ptrs


@_jit_closed
def _token_stats_fwd_kernel(
    z_ptr,
    z_stride: tl.int64,
    zq_ptr,
    zq_stride: tl.int64,
    labels_ptr,
    rows_ptr,
    lp_ptr,
    ent_ptr,
    kl_ptr,
    saved_ptr,
    nv: tl.int64,
    V: tl.int32,
    inv_t,
    HAS_LABELS: tl.constexpr,
    HAS_REF: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    V = _vocab_hint(V, ALIGNED)
    pid = tl.program_id(0)
    row = tl.load(rows_ptr + pid).to(tl.int64)
    z_row = z_ptr + row * z_stride
    zq_row = zq_ptr + row * zq_stride
    base = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    t = 0.0
    mq = float("-inf")
    sq = 0.0
    r = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + base
        inb = offs < V
        z = tl.load(_tile_ptrs(z_row, offs, ALIGNED), mask=inb, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        delta = (m - m_ref) * inv_t
        c = tl.exp(delta)
        a = (z - m_ref) * inv_t
        e = tl.exp(a)
        s_old = s
        s = c * s + tl.sum(e, axis=0)
        t = c * (t + tl.where(s_old > 0, delta * s_old, 0.0)) + tl.sum(
            tl.where(e > 0, e * a, 0.0), axis=0
        )
        if HAS_REF:
            zq = tl.load(_tile_ptrs(zq_row, offs, ALIGNED), mask=inb, other=float("-inf"))
            zq = zq.to(tl.float32)
            mq_new = tl.maximum(mq, tl.max(zq, axis=0))
            mq_ref = tl.where(mq_new == float("-inf"), 0.0, mq_new)
            delta_q = (mq - mq_ref) * inv_t
            aq = (zq - mq_ref) * inv_t
            r = c * (r + tl.where(s_old > 0, delta_q * s_old, 0.0)) + tl.sum(
                tl.where(e > 0, e * aq, 0.0), axis=0
            )
            sq = tl.exp(delta_q) * sq + tl.sum(tl.exp(aq), axis=0)
            mq = mq_new
        m = m_new
    logs = tl.log(s)
    ent = logs - t / s
    tl.store(ent_ptr + row, ent)
    tl.store(saved_ptr + pid, m)
    tl.store(saved_ptr + nv + pid, logs)
    tl.store(saved_ptr + 2 * nv + pid, ent)
    if HAS_LABELS:
        lab = tl.load(labels_ptr + row)
        z_lab = tl.load(z_row + lab).to(tl.float32)
        tl.store(lp_ptr + row, (z_lab - m) * inv_t - logs)
    if HAS_REF:
        logsq = tl.log(sq)
        kl = (t - r) / s - logs + logsq
        tl.store(kl_ptr + row, kl)
        tl.store(saved_ptr + 3 * nv + pid, mq)
        tl.store(saved_ptr + 4 * nv + pid, logsq)
        tl.store(saved_ptr + 5 * nv + pid, kl)


@_jit_closed
def _token_stats_bwd_kernel(
    z_ptr,
    z_stride: tl.int64,
    zq_ptr,
    zq_stride: tl.int64,
    dz_ptr,
    dzq_ptr,
    labels_ptr,
    rows_ptr,
    saved_ptr,
    glp_ptr,
    gh_ptr,
    gk_ptr,
    nv: tl.int64,
    V: tl.int32,
    inv_t,
    HAS_LABELS: tl.constexpr,
    HAS_ENT: tl.constexpr,
    HAS_REF: tl.constexpr,
    REF_GRAD: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    V = _vocab_hint(V, ALIGNED)
    pid = tl.program_id(0)
    row = tl.load(rows_ptr + pid).to(tl.int64)
    m = tl.load(saved_ptr + pid)
    logs = tl.load(saved_ptr + nv + pid)
    h = tl.load(saved_ptr + 2 * nv + pid)
    glp = 0.0
    gh = 0.0
    gk = 0.0
    lab = -1
    if HAS_LABELS:
        glp = tl.load(glp_ptr + row)
        lab = tl.load(labels_ptr + row)
    if HAS_ENT:
        gh = tl.load(gh_ptr + row)
    mq = 0.0
    logsq = 0.0
    d = 0.0
    if HAS_REF:
        gk = tl.load(gk_ptr + row)
        mq = tl.load(saved_ptr + 3 * nv + pid)
        logsq = tl.load(saved_ptr + 4 * nv + pid)
        d = tl.load(saved_ptr + 5 * nv + pid)
    alpha = -(glp + gh * h + gk * d) * inv_t
    beta = -(gh - gk) * inv_t
    gamma = -gk * inv_t
    z_row = z_ptr + row * z_stride
    zq_row = zq_ptr + row * zq_stride
    dz_row = dz_ptr + row * V
    dzq_row = dzq_ptr + row * V
    base = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + base
        inb = offs < V
        z = tl.load(_tile_ptrs(z_row, offs, ALIGNED), mask=inb, other=float("-inf")).to(tl.float32)
        logp = (z - m) * inv_t - logs
        p = tl.exp(logp)
        w = alpha + beta * logp
        logq = logp
        if HAS_REF:
            zq = tl.load(_tile_ptrs(zq_row, offs, ALIGNED), mask=inb, other=float("-inf"))
            zq = zq.to(tl.float32)
            logq = (zq - mq) * inv_t - logsq
            w += gamma * logq
        dz = tl.where(p > 0, p * w, 0.0) + tl.where(offs == lab, glp * inv_t, 0.0)
        tl.store(_tile_ptrs(dz_row, offs, ALIGNED), dz.to(dz_ptr.dtype.element_ty), mask=inb)
        if REF_GRAD:
            dzq = (gk * inv_t) * (tl.exp(logq) - p)
            dzq_ptrs = _tile_ptrs(dzq_row, offs, ALIGNED)
            tl.store(dzq_ptrs, dzq.to(dzq_ptr.dtype.element_ty), mask=inb)


def _block_v(vocab: int) -> int:
    """Vocabulary tile: ``GPU_BLOCKS_V`` on a GPU, the next power of two under the interpreter."""
    if BLOCK_V_OVERRIDE is not None:
        return BLOCK_V_OVERRIDE
    if interpreter_on():
        return min(triton.next_power_of_2(vocab), _INTERPRETER_MAX_BLOCK_V)
    return next((b for b in GPU_BLOCKS_V if vocab <= b), GPU_BLOCKS_V[-1])


def _launch_opts(block: int, dtype: torch.dtype) -> dict:
    """``num_warps``: 8 for tiles of ≥ 2048 columns, else 4; twice that for 8-byte dtypes.

    So a thread holds at most 16 elements and 64 bytes of each input tile (float64 at 4096
    with 8 warps spills on sm_90).
    """
    if interpreter_on():
        return {}
    warps = 8 if block >= 2048 else 4
    return {"num_warps": warps * 2 if dtype.itemsize == 8 else warps}


def _aligned(vocab: int, *tiles: torch.Tensor) -> bool:
    """True when V and every ``[N, V]`` tensor's row stride and address allow 16-byte vectors."""
    return vocab % ALIGNMENT == 0 and all(
        t.stride(0) % ALIGNMENT == 0 and t.data_ptr() % ALIGNMENT == 0 for t in tiles
    )


def _common_dtype(z: torch.Tensor, zq: torch.Tensor | None):
    """``(z, zq)`` in one dtype (``torch.promote_types``: exact), so mixed pairs add no variant."""
    if zq is None or zq.dtype == z.dtype:
        return z, zq
    dtype = torch.promote_types(z.dtype, zq.dtype)
    return z.to(dtype), zq.to(dtype)


def _alloc_outputs(z, rows):
    """Zeroed outputs ``lp, ent, kl`` ``[N]`` and the saved per-row scalars ``[6, Nv]``."""
    n, nv, dev = z.shape[0], rows.numel(), z.device
    lp = torch.zeros(n, dtype=F32, device=dev)  # [N]
    ent = torch.zeros(n, dtype=F32, device=dev)  # [N]
    kl = torch.zeros(n, dtype=F32, device=dev)  # [N]
    saved = torch.zeros(6, nv, dtype=F32, device=dev)  # [6, Nv]
    return lp, ent, kl, saved


def _fwd(z, labels, zq, rows, inv_t):
    """Launch the forward kernel on ``z [N, V]`` (unit last stride) for valid rows ``[Nv]``."""
    z, zq = _common_dtype(z, zq)
    lp, ent, kl, saved = _alloc_outputs(z, rows)
    nv = rows.numel()
    if nv:
        block = _block_v(z.shape[1])
        ref = zq if zq is not None else z  # [N, V]; unused without HAS_REF
        _token_stats_fwd_kernel[(nv,)](
            z,
            z.stride(0),
            ref,
            ref.stride(0),
            labels if labels is not None else rows,
            rows,
            lp,
            ent,
            kl,
            saved,
            nv,
            z.shape[1],
            float(inv_t),
            HAS_LABELS=labels is not None,
            HAS_REF=zq is not None,
            ALIGNED=_aligned(z.shape[1], z, ref),
            BLOCK_V=block,
            **_launch_opts(block, z.dtype),
        )
    return lp, ent, kl, saved


def _bwd(z, labels, zq, rows, saved, inv_t, g_lp, g_ent, g_kl, need_dzq):
    """``(dz [N, V] in z's dtype, dzq [N, V] in zq's dtype | None)`` for the valid rows."""
    z_dtype, zq_dtype = z.dtype, (zq.dtype if zq is not None else None)
    z, zq = _common_dtype(z, zq)
    n, v = z.shape
    nv = rows.numel()
    alloc = torch.empty if nv == n else torch.zeros
    dz = alloc(n, v, dtype=z.dtype, device=z.device)  # [N, V]
    dzq = alloc(n, v, dtype=zq.dtype, device=z.device) if need_dzq else None  # [N, V]
    has_lab = labels is not None and g_lp is not None
    has_ref = zq is not None and g_kl is not None
    if nv:
        block = _block_v(v)
        dummy = saved
        ref = zq if zq is not None else z  # [N, V]; unused without HAS_REF
        ref_grad = dzq if dzq is not None else dz  # [N, V]; unused without REF_GRAD
        _token_stats_bwd_kernel[(nv,)](
            z,
            z.stride(0),
            ref,
            ref.stride(0),
            dz,
            ref_grad,
            labels if labels is not None else rows,
            rows,
            saved,
            g_lp.float().contiguous() if has_lab else dummy,
            g_ent.float().contiguous() if g_ent is not None else dummy,
            g_kl.float().contiguous() if has_ref else dummy,
            nv,
            v,
            float(inv_t),
            HAS_LABELS=has_lab,
            HAS_ENT=g_ent is not None,
            HAS_REF=has_ref,
            REF_GRAD=need_dzq and has_ref,
            ALIGNED=_aligned(v, z, ref, dz, ref_grad),
            BLOCK_V=block,
            **_launch_opts(block, z.dtype),
        )
    dzq = dzq.to(zq_dtype) if dzq is not None else None
    return dz.to(z_dtype), dzq


class TritonTokenStats(torch.autograd.Function):
    """autograd wrapper: ``(z [N,V], zq [N,V]|None, labels [N]|None, rows [Nv]) → (lp, H, KL)``."""

    @staticmethod
    @without_autocast
    def forward(ctx, z, zq, labels, rows, inv_t):
        lp, ent, kl, saved = _fwd(z, labels, zq, rows, inv_t)
        ctx.save_for_backward(z, zq, labels, rows, saved)
        ctx.inv_t = inv_t
        ctx.set_materialize_grads(False)
        return lp, ent, kl

    @staticmethod
    @without_autocast
    def backward(ctx, g_lp, g_ent, g_kl):
        z, zq, labels, rows, saved = ctx.saved_tensors
        need_dz, need_dzq = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dz or need_dzq) or (g_lp is None and g_ent is None and g_kl is None):
            return None, None, None, None, None
        dz, dzq = _bwd(
            z, labels, zq, rows, saved, ctx.inv_t, g_lp, g_ent, g_kl, need_dzq and g_kl is not None
        )
        return (dz if need_dz else None), dzq, None, None, None
