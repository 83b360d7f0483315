"""Fused per-token log-probs, entropy and KL for RLHF (``rlhf_lightning.kernels``).

Every RLHF stage needs log π(label) per token; PPO also needs the entropy of π and the exact
KL(π ‖ π_ref) over the vocabulary. The naive recipe (log_softmax → gather, softmax →
entropy, KL over V) materialises several float32 ``[tokens, V]`` copies; here all three come
from ONE pass over the vocabulary, and :func:`linear_token_stats` never builds the logits.

Contract shared by all functions:

* ``logits`` ``[..., V]`` float32 / bfloat16 / float16 (float64 accepted), any leading dims;
  ``labels`` int64 ``[...]`` with ``-100`` = ignore; ``mask`` bool ``[...]`` (True = keep).
* Outputs are float32 ``[...]``; masked / ignored positions output 0, get gradient 0 and
  cost no vocabulary work. Gradients come back in the input dtype.
* ``temperature`` T > 0 divides the logits inside the kernel; inputs are never modified in
  place (saved tensors stay valid when several losses share the logits).
* ``-inf`` logits (masked vocabulary) and |logits| ≈ 1e4 stay finite; a row that is
  entirely ``-inf`` (or contains +inf / NaN) is not a distribution and gives NaN.
* ``backend`` (the ``token_*`` functions): ``None`` (default: env ``RLHF_KERNEL_BACKEND``, else
  Triton for CUDA tensors and chunked torch for CPU tensors), ``"triton"`` or ``"torch"`` /
  ``"chunked"``. :func:`linear_token_stats` has none: it runs torch tiles on every device.
"""

from __future__ import annotations

import torch

from . import chunked, dispatch, linear
from .reference import IGNORE_INDEX

__all__ = [
    "token_logprobs",
    "token_entropy",
    "token_kl",
    "token_stats",
    "linear_token_stats",
    "kl_penalty",
]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_float(name: str, field: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name}: `{field}` must be a float32/bfloat16/float16 tensor, got {got}")


def _check_temperature(name: str, temperature) -> float:
    t = float(temperature)
    if not (t > 0 and t != float("inf")):
        raise ValueError(f"{name}: `temperature` must be a finite number > 0, got {temperature!r}")
    return 1.0 / t


def _valid_rows(name, lead, vocab, labels, mask, device):
    """Flatten labels / mask and return ``(labels [N] | None, valid [N] bool)``."""
    n = 1
    for d in lead:
        n *= d
    valid = torch.ones(n, dtype=torch.bool, device=device)  # [N]
    if mask is not None:
        if tuple(mask.shape) != tuple(lead):
            raise ValueError(f"{name}: `mask` shape {tuple(mask.shape)} != {tuple(lead)}")
        valid = mask.reshape(-1).to(device=device, dtype=torch.bool)
    lab = None
    if labels is not None:
        if tuple(labels.shape) != tuple(lead):
            raise ValueError(f"{name}: `labels` shape {tuple(labels.shape)} != {tuple(lead)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"{name}: `labels` must be an integer tensor, got {labels.dtype}")
        lab = labels.reshape(-1).to(device=device, dtype=torch.int64)  # [N]
        valid = valid & (lab != IGNORE_INDEX)
        bad = valid & ((lab < 0) | (lab >= vocab))  # [N]
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name}: `labels` has {int(bad.sum())} value(s) outside [0, {vocab}) that are "
                f"not -100 (first: {int(lab[i])} at flat position {i})"
            )
        lab = torch.where(valid, lab, torch.zeros_like(lab))
    return lab, valid


def _flat(x: torch.Tensor, vocab: int) -> torch.Tensor:
    z = x.reshape(-1, vocab)  # [N, V]
    return z if z.stride(-1) == 1 else z.contiguous()


def _run(name, logits, labels, ref_logits, temperature, mask, backend, want_ent):
    _check_float(name, "logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name}: `logits` must have a non-empty last (vocabulary) dim")
    inv_t = _check_temperature(name, temperature)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    if ref_logits is not None:
        _check_float(name, "ref_logits", ref_logits)
        if ref_logits.shape != logits.shape:
            raise ValueError(
                f"{name}: `ref_logits` shape {tuple(ref_logits.shape)} != {tuple(logits.shape)}"
            )
    lab, valid = _valid_rows(name, lead, vocab, labels, mask, logits.device)
    z = _flat(logits, vocab)  # [N, V]
    zq = None if ref_logits is None else _flat(ref_logits, vocab)  # [N, V]
    which = dispatch.resolve_backend(logits, backend)
    if which == "triton":
        from .triton_token_stats import TritonTokenStats

        rows = valid.nonzero().squeeze(1)  # [Nv]
        lp, ent, kl = TritonTokenStats.apply(z, zq, lab, rows, inv_t)
    else:
        rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)  # [Nv] | None
        lp, ent, kl = chunked.ChunkedTokenStats.apply(z, zq, lab, rows, inv_t, want_ent, None)
    return (
        lp.view(lead) if labels is not None else None,
        ent.view(lead),
        kl.view(lead) if ref_logits is not None else None,
    )


def token_stats(logits, labels, ref_logits=None, *, temperature=1.0, mask=None, backend=None):
    """Log-prob of ``labels``, entropy and (with ``ref_logits``) exact KL in one pass.

    Args:
        logits: ``[..., V]`` policy logits (float32 / bfloat16 / float16).
        labels: int64 ``[...]`` target ids; ``-100`` masks the position.
        ref_logits: optional ``[..., V]`` reference-model logits (same temperature applied).
        temperature: T > 0; statistics are of softmax(logits / T).
        mask: optional bool ``[...]``; False positions output 0 and get no gradient.
        backend: ``None`` | ``"triton"`` | ``"torch"`` (see module docs).

    Returns:
        ``(logprobs, entropy, kl)``, each float32 ``[...]``; ``kl`` is None without
        ``ref_logits``. All three are differentiable (w.r.t. logits and ref_logits).
    """
    return _run("token_stats", logits, labels, ref_logits, temperature, mask, backend, True)


def token_logprobs(logits, labels, *, temperature=1.0, mask=None, backend=None):
    """float32 ``[...]`` log π(label) = log softmax(logits / T)[label] per position.

    ``logits`` ``[..., V]``, ``labels`` int64 ``[...]`` (``-100`` masks), ``mask`` bool
    ``[...]``; masked positions give 0 and gradient 0; grads in the input dtype.
    """
    return _run("token_logprobs", logits, labels, None, temperature, mask, backend, False)[0]


def token_entropy(logits, *, temperature=1.0, mask=None, backend=None):
    """float32 ``[...]`` entropy H = -Σ p log p of p = softmax(logits / T) per position.

    Differentiable (it is a PPO loss term); ``-inf`` logits contribute 0; masked positions
    give 0 and gradient 0; grads in the input dtype.
    """
    return _run("token_entropy", logits, None, None, temperature, mask, backend, True)[1]


def token_kl(logits, ref_logits, *, temperature=1.0, mask=None, backend=None):
    """float32 ``[...]`` exact KL(π ‖ π_ref) = Σ p (log p - log q) over the vocabulary.

    p = softmax(logits / T), q = softmax(ref_logits / T); gradients flow to both inputs
    (∂/∂logits = p (log p - log q - KL)/T, ∂/∂ref_logits = (q - p)/T); masked positions 0.
    """
    return _run("token_kl", logits, None, ref_logits, temperature, mask, backend, False)[2]


def _check_linear_inputs(name, hidden, weight, bias, ref_hidden, ref_weight) -> None:
    """Dtypes and shapes of :func:`linear_token_stats`' tensors (one-line errors)."""
    _check_float(name, "hidden", hidden)
    _check_float(name, "weight", weight)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: `weight` must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: `bias` shape {tuple(bias.shape)} != ({weight.shape[0]},)")
    if ref_hidden is not None and ref_hidden.shape != hidden.shape:
        raise ValueError(f"{name}: `ref_hidden` shape {tuple(ref_hidden.shape)} != hidden's")
    if ref_weight is not None and ref_weight.shape != weight.shape:
        raise ValueError(f"{name}: `ref_weight` shape {tuple(ref_weight.shape)} != weight's")


def _reference_side(hidden, weight, bias, ref_hidden, ref_weight, rows):
    """``(hq [Nv, H], wq [V, H], bq [V] | None)`` of the reference, detached; all None without one.

    A missing ``ref_hidden`` / ``ref_weight`` defaults to the policy's; ``bias`` is shared only
    when ``ref_weight`` is None.
    """
    if ref_hidden is None and ref_weight is None:
        return None, None, None
    width = hidden.shape[-1]
    src = hidden if ref_hidden is None else ref_hidden
    hq = src.detach().reshape(-1, width).index_select(0, rows).to(hidden.dtype)  # [Nv, H]
    wq = (weight if ref_weight is None else ref_weight).detach().to(weight.dtype)  # [V, H]
    bq = bias.detach() if (bias is not None and ref_weight is None) else None  # [V] | None
    return hq, wq, bq


def linear_token_stats(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ref_hidden=None,
    ref_weight=None,
    temperature=1.0,
    mask=None,
    chunk_size=None,
):
    """``token_stats(hidden @ weight.T + bias, labels, ref_hidden @ ref_weight.T)`` without logits.

    Args:
        hidden: ``[..., H]`` final hidden states (float32 / bfloat16 / float16).
        weight: ``[V, H]`` LM-head weight; ``bias``: optional ``[V]``.
        labels: int64 ``[...]``; ``-100`` masks. ``mask``: optional bool ``[...]``.
        ref_hidden, ref_weight: reference side for the exact KL; a missing one defaults to the
            policy's (``bias`` is shared only when ``ref_weight`` is None). No gradients.
        temperature: T > 0. chunk_size: tokens per row block (default 2048); memory is
            O(chunk_size · TILE_V) besides the gradients.

    There is no ``backend`` argument: this op runs torch tiles (matmuls + elementwise) on
    every device, so ``RLHF_KERNEL_BACKEND`` does not apply to it.

    Returns:
        ``(logprobs, entropy, kl)`` float32 ``[...]`` (kl None without a reference side);
        backward gives gradients for ``hidden``, ``weight`` and ``bias`` in their dtypes
        (``weight`` accumulated in float32 when several row blocks are needed).
    """
    name = "linear_token_stats"
    _check_linear_inputs(name, hidden, weight, bias, ref_hidden, ref_weight)
    inv_t = _check_temperature(name, temperature)
    lead, width, vocab = hidden.shape[:-1], hidden.shape[-1], weight.shape[0]
    lab, valid = _valid_rows(name, lead, vocab, labels, mask, hidden.device)
    rows = valid.nonzero().squeeze(1)  # [Nv]
    h = hidden.reshape(-1, width).index_select(0, rows)  # [Nv, H]
    hq, wq, bq = _reference_side(hidden, weight, bias, ref_hidden, ref_weight, rows)
    chunk = max(1, int(chunk_size or linear.DEFAULT_CHUNK_TOKENS))
    labs = lab.index_select(0, rows) if lab is not None else torch.zeros_like(rows)  # [Nv]
    lp, ent, kl = linear.LinearTokenStats.apply(
        h, weight, bias, hq, wq, bq, labs, inv_t, chunk, linear.TILE_V
    )
    outs = []
    for x in (lp, ent, kl):
        full = x.new_zeros(valid.shape[0]).index_put((rows,), x)  # [N]
        outs.append(full.view(lead))
    return (outs[0] if labels is not None else None), outs[1], (outs[2] if hq is not None else None)


def kl_penalty(logprobs, ref_logprobs, kind="k1"):
    """Per-token KL estimator from sampled-token log-probs (Schulman, 2020), float32.

    With r = ref_logprobs - logprobs: ``"k1"`` = -r (unbiased, can be negative), ``"k2"`` =
    r²/2, ``"k3"`` = e^r - 1 - r (unbiased, ≥ 0). Differentiable; shapes must match.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"kl_penalty: `ref_logprobs` shape {tuple(ref_logprobs.shape)} != "
            f"`logprobs` shape {tuple(logprobs.shape)}"
        )
    r = ref_logprobs.float() - logprobs.float()
    if kind == "k1":
        return -r
    if kind == "k2":
        return 0.5 * r * r
    if kind == "k3":
        return torch.expm1(r) - r
    raise ValueError(f"kl_penalty: `kind` must be 'k1', 'k2' or 'k3', got {kind!r}")
