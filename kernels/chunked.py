"""Chunked-torch backend: one-pass log-prob / entropy / KL over row chunks (CPU path).

Same API and numerics contract as the Triton kernels, written with plain torch ops so it
runs anywhere. Rows of ``[N, V]`` logits are processed ``chunk_rows`` at a time into
preallocated float32 work buffers (three ``[chunk_rows, V]`` buffers at most), so the extra
memory is bounded by the chunk size, not by N. The buffers are reused (no fresh page faults
per chunk) and 16 MiB each by default, so per-op thread start-up stays negligible.

Per chunk the forward is a handful of fused ATen ops: log p = log_softmax(z / T) (for T != 1
the raw max is subtracted before scaling, so |z| ≈ 1e4 keeps full precision), p = exp(log p),
H = -Σ p log p, KL = Σ p (log p - log q), log π(y) = log p[y].
Backward (per-row scalars g_lp, g_H, g_KL; 1/T folded into the coefficients) recomputes log p
(renormalised so that each row of p sums to 1 in the work dtype):
    dz = (1/T) [g_lp·onehot - p ⊙ (g_lp + g_H (log p + H) - g_KL (log p - log q - KL))],
    dz_q = (g_KL/T) (q - p).
``-inf`` entries make ``p·log p`` NaN (0·-inf); such rows are detected from the NaN and
recomputed with a ``where`` (the common case pays nothing).

References: M. Milakov & N. Gimelshein, "Online normalizer calculation for softmax" (2018)
for the shifted log-sum-exp; the gradient identities are derived in ``triton_token_stats.py``.
"""

from __future__ import annotations

import os

import torch

from .dispatch import without_autocast

#: Default number of float32 elements per work buffer (rows per chunk = this // V).
CHUNK_ELEMENTS = int(os.environ.get("RLHF_KERNEL_CHUNK_ELEMENTS", 1 << 22))

F32 = torch.float32


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation for 16/32-bit inputs; float64 inputs stay float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else F32


def chunk_rows_for(vocab: int, chunk_rows: int | None = None) -> int:
    """Rows per chunk: ``chunk_rows`` if given, else ``CHUNK_ELEMENTS // vocab`` (≥ 1)."""
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def rowdot(e: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_v e·a per row, treating e == 0 entries as 0 even where a is -inf; returns (dot, bad)."""
    d = torch.linalg.vecdot(e, a)  # [C]
    bad = torch.isnan(d)  # [C] rows that hit 0 * -inf (or genuine NaN input)
    if bool(bad.any()):
        eb, ab = e[bad], a[bad]  # [c, V]
        d[bad] = (eb * torch.where(eb > 0, ab, torch.zeros((), dtype=ab.dtype))).sum(-1)
    return d, bad


def _take(x: torch.Tensor | None, rows: torch.Tensor | None, r0: int, r1: int):
    """Rows r0:r1 of the valid-row list: a view when all rows are valid, else a gather."""
    if x is None:
        return None
    if rows is None:
        return x[r0:r1]
    return x.index_select(0, rows[r0:r1])


def _shifted(z: torch.Tensor, out: torch.Tensor, inv_t: float) -> torch.Tensor:
    """Write a = (z - max z) * inv_t into ``out`` (work dtype); return the raw max ``[C, 1]``."""
    m = z.amax(1, keepdim=True).to(out.dtype)  # [C, 1]
    torch.sub(z, m, out=out)  # [C, V]
    if inv_t != 1.0:
        out.mul_(inv_t)
    return m


def _log_probs(z: torch.Tensor, out: torch.Tensor, inv_t: float) -> torch.Tensor:
    """``out = log_softmax(z / T)`` in the work dtype (one fused op when T = 1).

    For T != 1 the max is subtracted from the raw logits before scaling, so |z| ≈ 1e4 keeps
    full precision; ``out`` may be used in place.
    """
    if inv_t != 1.0:
        _shifted(z, out, inv_t)
        src = out
    elif z.dtype != out.dtype:
        src = out.copy_(z)
    else:
        src = z
    return torch._log_softmax(src, 1, False, out=out)


def stats_forward(z, labels, zq, rows, inv_t, want_ent=True, chunk_rows=None):
    """Forward over valid rows of ``z`` ``[N, V]``; labels ``[N]`` or None; zq ``[N, V]`` or None.

    Returns ``(lp, ent, kl, saved, flags)``: outputs ``[N]`` (0 on invalid rows); ``saved``
    ``[2, Nv]`` = (H, KL) per valid row; ``flags`` ``[Nv]`` bool: rows with -inf entries
    (backward needs the slow fix-up there).
    """
    n, v = z.shape
    nv = n if rows is None else rows.numel()
    dev, wd = z.device, work_dtype(z.dtype)
    lp = torch.zeros(n, dtype=wd, device=dev)  # [N]
    ent = torch.zeros(n, dtype=wd, device=dev)  # [N]
    kl = torch.zeros(n, dtype=wd, device=dev)  # [N]
    saved = torch.zeros(2, nv, dtype=wd, device=dev)  # [2, Nv]
    flags = torch.zeros(nv, dtype=torch.bool, device=dev)  # [Nv]
    c = min(chunk_rows_for(v, chunk_rows), max(nv, 1))
    buf_a = torch.empty(c, v, dtype=wd, device=dev)  # [C, V]
    buf_e = torch.empty(c, v, dtype=wd, device=dev)  # [C, V]
    buf_q = torch.empty(c, v, dtype=wd, device=dev) if zq is not None else None  # [C, V]
    for r0 in range(0, nv, c):
        r1 = min(nv, r0 + c)
        k = r1 - r0
        logp = _log_probs(_take(z, rows, r0, r1), buf_a[:k], inv_t)  # [k, V]
        dst = slice(r0, r1) if rows is None else rows[r0:r1]
        if labels is not None:
            lab = _take(labels, rows, r0, r1).unsqueeze(1)  # [k, 1]
            lp[dst] = logp.gather(1, lab).squeeze(1)
        if not (want_ent or zq is not None):
            continue
        p = torch.exp(logp, out=buf_e[:k])  # [k, V]
        neg_h, bad = rowdot(p, logp)  # [k]  Σ p log p (0 where p = 0)
        saved[0, r0:r1] = -neg_h
        if want_ent:
            ent[dst] = -neg_h
        if zq is not None:
            logq = _log_probs(_take(zq, rows, r0, r1), buf_q[:k], inv_t)  # [k, V]
            d, badq = rowdot(p, logp.sub_(logq))  # [k]  Σ p (log p - log q)
            saved[1, r0:r1] = d
            kl[dst] = d
            bad = bad | badq
        flags[r0:r1] = bad
    return lp, ent, kl, saved, flags


def _row_grads(g, rows, r0, r1, k, dev, wd):
    """Upstream gradient for rows r0:r1 as ``[k, 1]`` in the work dtype (zeros when None)."""
    if g is None:
        return torch.zeros(k, 1, dtype=wd, device=dev)
    return _take(g.to(wd), rows, r0, r1).unsqueeze(1)


def stats_backward(
    z, labels, zq, rows, inv_t, saved, flags, g_lp, g_ent, g_kl, need_dzq, chunk_rows=None
):
    """Gradients ``(dz, dzq)`` (input dtypes; dzq None unless ``need_dzq``) of the forward."""
    n, v = z.shape
    nv = n if rows is None else rows.numel()
    dev, wd = z.device, work_dtype(z.dtype)
    alloc = torch.empty if rows is None else torch.zeros
    dz = alloc(n, v, dtype=z.dtype, device=dev)  # [N, V]
    dzq = alloc(n, v, dtype=zq.dtype, device=dev) if need_dzq else None  # [N, V]
    use_q = zq is not None and g_kl is not None
    c = min(chunk_rows_for(v, chunk_rows), max(nv, 1))
    buf_a = torch.empty(c, v, dtype=wd, device=dev)  # [C, V]
    buf_e = torch.empty(c, v, dtype=wd, device=dev)  # [C, V]
    buf_q = torch.empty(c, v, dtype=wd, device=dev) if use_q else None  # [C, V]
    for r0 in range(0, nv, c):
        r1 = min(nv, r0 + c)
        k = r1 - r0
        h, d = (x[r0:r1].unsqueeze(1) for x in saved)  # each [k, 1]
        glp = _row_grads(g_lp if labels is not None else None, rows, r0, r1, k, dev, wd)
        gh = _row_grads(g_ent, rows, r0, r1, k, dev, wd)
        gk = _row_grads(g_kl if use_q else None, rows, r0, r1, k, dev, wd)
        alpha = -(glp + gh * h + gk * d) * inv_t  # [k, 1]
        beta = -(gh - gk) * inv_t  # [k, 1]
        w = _log_probs(_take(z, rows, r0, r1), buf_a[:k], inv_t)  # log p [k, V]
        p = torch.exp(w, out=buf_e[:k])  # [k, V]
        _renormalise(p, w)
        if g_ent is None and not use_q:  # log-prob only: dz = -p·g_lp/T (+ onehot)
            torch.mul(p, alpha, out=w)
        else:
            w.mul_(beta).add_(alpha)
            if use_q:
                lq = _log_probs(_take(zq, rows, r0, r1), buf_q[:k], inv_t)  # log q [k, V]
                w.addcmul_(lq, gk, value=-inv_t)
            w.mul_(p)
            if bool(flags[r0:r1].any()):
                w.masked_fill_(p == 0, 0.0)  # 0 · (±inf) from -inf entries
        if labels is not None and g_lp is not None:
            lab = _take(labels, rows, r0, r1).unsqueeze(1)  # [k, 1]
            w.scatter_add_(1, lab, glp * inv_t)
        _store(dz, w, rows, r0, r1)
        if need_dzq:
            lq.exp_().sub_(p).mul_(gk * inv_t)  # (g_KL / T)(q - p)
            _store(dzq, lq, rows, r0, r1)
    return dz, dzq


def _renormalise(p: torch.Tensor, logp: torch.Tensor) -> None:
    """Make each row of ``p`` sum to 1 in the work dtype, in place (``logp`` shifted to match).

    log_softmax's float32 log-sum-exp is off by a few ulps, so ``exp(log p)`` sums to 1 + ε per
    row; the entropy term p ⊙ (log p + H) would carry that ε (about 2× torch's own error at
    V = 262144). Dividing by the row sum removes it for one extra row reduction.
    """
    total = p.sum(1, keepdim=True)  # [k, 1]
    p.div_(total)
    logp.sub_(total.log_())


def _store(dst: torch.Tensor, src: torch.Tensor, rows, r0: int, r1: int) -> None:
    if rows is None:
        dst[r0:r1].copy_(src)
    else:
        dst.index_copy_(0, rows[r0:r1], src.to(dst.dtype))


class ChunkedTokenStats(torch.autograd.Function):
    """autograd wrapper: ``(z [N,V], zq [N,V]|None, labels [N]|None, rows|None) → (lp, H, KL)``."""

    @staticmethod
    @without_autocast
    def forward(ctx, z, zq, labels, rows, inv_t, want_ent, chunk_rows):
        lp, ent, kl, saved, flags = stats_forward(z, labels, zq, rows, inv_t, want_ent, chunk_rows)
        ctx.save_for_backward(z, zq, labels, rows, saved, flags)
        ctx.inv_t, ctx.chunk_rows = inv_t, chunk_rows
        ctx.set_materialize_grads(False)
        return lp, ent, kl

    @staticmethod
    @without_autocast
    def backward(ctx, g_lp, g_ent, g_kl):
        z, zq, labels, rows, saved, flags = ctx.saved_tensors
        need_dz, need_dzq = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dz or need_dzq) or (g_lp is None and g_ent is None and g_kl is None):
            return None, None, None, None, None, None, None
        dz, dzq = stats_backward(
            z,
            labels,
            zq,
            rows,
            ctx.inv_t,
            saved,
            flags,
            g_lp,
            g_ent,
            g_kl,
            need_dzq and g_kl is not None,
            ctx.chunk_rows,
        )
        return (dz if need_dz else None), dzq, None, None, None, None, None
