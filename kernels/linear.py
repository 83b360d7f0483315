"""Fused linear + token statistics: log-probs, entropy and KL straight from hidden states.

``logits = hidden @ weight.T (+ bias)`` is never materialised as ``[N, V]``. The valid tokens
are processed in row blocks of ``chunk_size`` tokens, and each block walks the vocabulary in
tiles of ``TILE_V`` columns: the ``[chunk, TILE_V]`` logits tile is produced by one matmul
into a reused buffer and folded into online per-row accumulators (the same shifted
log-sum-exp / entropy / KL recurrences as ``triton_token_stats.py``). Backward recomputes each tile
(FLOPs traded for memory, as in activation checkpointing), forms ``dz`` for the tile from
the saved per-row scalars, and immediately contracts it:
``d hidden += dz @ W_tile`` (float32 accumulator) and ``d W_tile = dzᵀ @ hidden`` (written once
per tile when one row block holds all tokens, else accumulated in float32).
Extra memory: a few ``[chunk, TILE_V]`` float32 buffers plus the gradients themselves.
Inside ``kernels.onednn_linear.onednn_linears`` (float32 CPU tensors), the logit tiles and
``d hidden`` run on oneDNN (``matmul_nt``), ``d W_tile`` stays on torch.mm.

The reference side (``ref_hidden`` / ``ref_weight``) is treated as a constant: no gradients.

References: Liger-Kernel's fused linear cross-entropy (Hsu et al., 2024) for the idea of
never materialising logits; Milakov & Gimelshein (2018) for the online normaliser.
"""

from __future__ import annotations

import os

import torch

from . import onednn_linear
from .chunked import rowdot
from .dispatch import without_autocast

#: Vocabulary columns per tile (a multiple of 64 keeps the matmuls efficient).
TILE_V = int(os.environ.get("RLHF_KERNEL_TILE_V", 4096))
#: Default tokens per row block.
DEFAULT_CHUNK_TOKENS = 2048
F32 = torch.float32
NEG_INF = float("-inf")


def _on_onednn(h, w, b) -> bool:
    """Whether this block's float32 CPU tiles run on oneDNN (an `onednn_linears` context is
    open: `kernels.onednn_linear`; its rules apply to a whole tile and its bias)."""
    if not onednn_linear.active() or not w.is_contiguous():
        return False
    n = min(TILE_V, w.shape[0])
    return onednn_linear.suits(h, w[:n], None if b is None else b[:n])


def _tile_logits(h, w, b, v0, v1, out):
    """``out[:, :v1-v0] = h @ w[v0:v1].T (+ b[v0:v1])``; returns that view ``[R, vt]`` (or, on
    oneDNN, a new tensor)."""
    if _on_onednn(h, w, b):
        return onednn_linear.matmul_nt(h.contiguous(), w[v0:v1], None if b is None else b[v0:v1])
    o = out[:, : v1 - v0]
    if b is None:
        torch.mm(h, w[v0:v1].T, out=o)
    else:
        torch.addmm(b[v0:v1], h, w[v0:v1].T, out=o)
    return o


def _shift(zt, m_ref, inv_t, out):
    """``out = (zt - m_ref) * inv_t`` in float32 (``out`` may alias ``zt``)."""
    torch.sub(zt, m_ref.unsqueeze(1), out=out)
    if inv_t != 1.0:
        out.mul_(inv_t)
    return out


def _new_max(m, zt):
    """Running raw max after a tile and the finite reference point used for shifting."""
    m_new = torch.maximum(m, zt.amax(1).to(F32))  # [R]
    return m_new, torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)


def _buffers(r, tile, dtype, dev, n):
    """n float32 work tiles (+ one in the input dtype when it is not float32)."""
    bufs = [torch.empty(r, tile, dtype=F32, device=dev) for _ in range(n)]
    raw = bufs[0] if dtype == F32 else torch.empty(r, tile, dtype=dtype, device=dev)
    return raw, bufs


def _block_forward(h, w, b, hq, wq, bq, lab, inv_t, tile):
    """Online statistics for one row block; returns the per-row state ``[8, R]``."""
    r_, v = h.shape[0], w.shape[0]
    dev = h.device
    m = torch.full((r_,), NEG_INF, dtype=F32, device=dev)  # [R]
    s, t, zl = (torch.zeros(r_, dtype=F32, device=dev) for _ in range(3))  # [R]
    mq = m.clone()
    sq, rr = torch.zeros_like(s), torch.zeros_like(s)
    flags = torch.zeros(r_, dtype=torch.bool, device=dev)  # [R]
    ref = hq is not None
    raw, (a_buf, e_buf, q_buf) = _buffers(r_, min(tile, v), h.dtype, dev, 3)
    raw_q = (q_buf if h.dtype == F32 else torch.empty_like(raw)) if ref else None
    for v0 in range(0, v, tile):
        v1 = min(v, v0 + tile)
        zt = _tile_logits(h, w, b, v0, v1, raw)  # [R, vt]
        hit = ((lab >= v0) & (lab < v1)).nonzero().squeeze(1)  # rows whose label is here
        if hit.numel():
            zl[hit] = zt[hit, lab[hit] - v0].to(F32)
        m_new, m_ref = _new_max(m, zt)
        delta = (m - m_ref) * inv_t  # [R]
        c = torch.exp(delta)  # [R]
        a = _shift(zt, m_ref, inv_t, a_buf[:, : v1 - v0])  # [R, vt]
        e = torch.exp(a, out=e_buf[:, : v1 - v0])  # [R, vt]
        te, bad = rowdot(e, a)
        s_old = s
        live = s_old > 0
        s = c * s + e.sum(1)
        t = c * (t + torch.where(live, delta * s_old, 0.0)) + te
        if ref:
            zq = _tile_logits(hq, wq, bq, v0, v1, raw_q)  # [R, vt]
            mq_new, mq_ref = _new_max(mq, zq)
            delta_q = (mq - mq_ref) * inv_t  # [R]
            aq = _shift(zq, mq_ref, inv_t, q_buf[:, : v1 - v0])  # [R, vt]
            rq, badq = rowdot(e, aq)
            rr = c * (rr + torch.where(live, delta_q * s_old, 0.0)) + rq
            sq = torch.exp(delta_q) * sq + aq.exp_().sum(1)
            mq = mq_new
            bad = bad | badq
        m = m_new
        flags |= bad
    logs = s.log()  # [R]
    ent = logs - t / s  # [R]
    lp = (zl - m) * inv_t - logs  # [R]
    logsq = sq.log() if ref else torch.zeros_like(s)
    kl = (t - rr) / s - logs + logsq if ref else torch.zeros_like(s)
    return torch.stack([lp, ent, kl, m, logs, mq, logsq, flags.to(F32)])  # [8, R]


def _block_backward(h, w, b, hq, wq, bq, lab, inv_t, tile, state, g, dh_on, dw, db, acc_w):
    """Gradient of one row block: returns ``d h`` (float32 ``[R, H]``); fills dw / db tiles."""
    r_, v = h.shape[0], w.shape[0]
    dev = h.device
    _, h_ent, d_kl, m, logs, mq, logsq, flags = state.unbind(0)  # each [R]
    glp, gh, gk = g  # each [R] float32 or None
    zeros = torch.zeros(r_, dtype=F32, device=dev)
    glp0 = glp if glp is not None else zeros
    gh0 = gh if gh is not None else zeros
    use_q = hq is not None and gk is not None
    gk0 = gk if use_q else zeros
    alpha = (-(glp0 + gh0 * h_ent + gk0 * d_kl) * inv_t).unsqueeze(1)  # [R, 1]
    beta = (-(gh0 - gk0) * inv_t).unsqueeze(1)  # [R, 1]
    gamma = (-gk0 * inv_t).unsqueeze(1)  # [R, 1]
    any_flag = bool(flags.any())
    dh = torch.zeros(r_, h.shape[1], dtype=F32, device=dev) if dh_on else None  # [R, H]
    raw, (a_buf, e_buf, q_buf) = _buffers(r_, min(tile, v), h.dtype, dev, 3)
    raw_q = (q_buf if h.dtype == F32 else torch.empty_like(raw)) if use_q else None
    dz_raw = a_buf if h.dtype == F32 else torch.empty_like(raw)
    for v0 in range(0, v, tile):
        v1 = min(v, v0 + tile)
        vt = v1 - v0
        zt = _tile_logits(h, w, b, v0, v1, raw)  # [R, vt]
        lgp = _shift(zt, m, inv_t, a_buf[:, :vt]).sub_(logs.unsqueeze(1))  # log p [R, vt]
        p = torch.exp(lgp, out=e_buf[:, :vt])  # [R, vt]
        if gh is None and not use_q:
            wt = torch.mul(p, alpha, out=lgp)  # [R, vt]
        else:
            wt = lgp.mul_(beta).add_(alpha)
            if use_q:
                zq = _tile_logits(hq, wq, bq, v0, v1, raw_q)  # [R, vt]
                lq = _shift(zq, mq, inv_t, q_buf[:, :vt]).sub_(logsq.unsqueeze(1))  # log q
                wt.addcmul_(lq, gamma)
            wt.mul_(p)
            if any_flag:
                wt.masked_fill_(p == 0, 0.0)
        hit = ((lab >= v0) & (lab < v1)).nonzero().squeeze(1)
        if glp is not None and hit.numel():
            wt[hit, lab[hit] - v0] += glp[hit] * inv_t
        dz = wt if h.dtype == F32 else dz_raw[:, :vt].copy_(wt)  # [R, vt] input dtype
        if dh is not None:
            if _on_onednn(h, w, b):  # dz W_tile: the tile's transposed view is oneDNN's weight
                dh += onednn_linear.matmul_nt(dz.contiguous(), w[v0:v1].t())
            elif h.dtype == F32:
                dh.addmm_(dz, w[v0:v1])
            else:
                dh += torch.mm(dz, w[v0:v1]).to(F32)
        if dw is not None:
            if acc_w:
                dw[v0:v1] += torch.mm(dz.T, h).to(dw.dtype)
            else:
                torch.mm(dz.T, h, out=dw[v0:v1])
        if db is not None:
            db[v0:v1] += wt.sum(0)
    return dh


class LinearTokenStats(torch.autograd.Function):
    """autograd wrapper over valid rows; outputs ``(lp, H, KL)`` as ``[Nv]`` float32."""

    @staticmethod
    @without_autocast
    def forward(ctx, h, w, b, hq, wq, bq, lab, inv_t, chunk, tile):
        nv = h.shape[0]
        states = [
            _block_forward(
                h[i : i + chunk],
                w,
                b,
                None if hq is None else hq[i : i + chunk],
                wq,
                bq,
                lab[i : i + chunk],
                inv_t,
                tile,
            )
            for i in range(0, nv, chunk)
        ]
        state = torch.cat(states, 1) if states else torch.zeros(8, 0, device=h.device)  # [8, Nv]
        ctx.save_for_backward(h, w, b, hq, wq, bq, lab, state)
        ctx.inv_t, ctx.chunk, ctx.tile = inv_t, chunk, tile
        ctx.set_materialize_grads(False)
        return state[0].clone(), state[1].clone(), state[2].clone()

    @staticmethod
    @without_autocast
    def backward(ctx, g_lp, g_ent, g_kl):
        h, w, b, hq, wq, bq, lab, state = ctx.saved_tensors
        nh, nw, nb = ctx.needs_input_grad[:3]
        none = (None,) * 7
        if g_lp is None and g_ent is None and g_kl is None:
            return (None, None, None) + none
        chunk, nv = ctx.chunk, h.shape[0]
        acc_w = nv > chunk
        dw = None
        if nw:
            dw_dtype = F32 if acc_w else w.dtype
            dw = (torch.zeros if acc_w else torch.empty)(w.shape, dtype=dw_dtype, device=w.device)
        db = torch.zeros(w.shape[0], dtype=F32, device=w.device) if nb else None
        dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if nh else None  # [Nv, H]
        gs = [None if g is None else g.to(F32) for g in (g_lp, g_ent, g_kl)]
        for i in range(0, nv, chunk):
            sl = slice(i, i + chunk)
            dhb = _block_backward(
                h[sl],
                w,
                b,
                None if hq is None else hq[sl],
                wq,
                bq,
                lab[sl],
                ctx.inv_t,
                ctx.tile,
                state[:, sl],
                [None if g is None else g[sl] for g in gs],
                nh,
                dw,
                db,
                acc_w,
            )
            if dh is not None:
                dh[sl] = dhb
        dw = None if dw is None else dw.to(w.dtype)
        db = None if db is None else db.to(b.dtype)
        return (dh, dw, db) + none
