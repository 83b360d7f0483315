"""Plain-torch reference implementations of the token statistics (ground truth).

These functions materialise the full ``[..., V]`` log-softmax and are therefore only meant
for tests and benchmarks ("naive torch" provider). They compute in ``dtype`` (float64 by
default, so the result is exact to ~1e-15 for float32 / bfloat16 inputs) and are fully
differentiable through autograd, which makes them the gradient ground truth as well.
Pass ``dtype=None`` to compute in the input's own dtype (used to measure "torch's own
bfloat16 error").

Conventions match :mod:`rlhf_lightning.kernels`: a position is valid when ``mask`` is True
and its label is not ``-100``; invalid positions output exactly 0 (and receive gradient 0).
Entries equal to ``-inf`` (masked vocabulary) contribute 0 to entropy and KL.

References: the definitions H = -Σ p log p and KL(p‖q) = Σ p (log p - log q) (Cover & Thomas,
*Elements of Information Theory*, ch. 2); the k1/k2/k3 estimators follow J. Schulman,
"Approximating KL Divergence" (2020).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _valid(shape: torch.Size, labels: torch.Tensor | None, mask: torch.Tensor | None, device):
    """Bool tensor of valid positions ``[...]`` (mask True and label != -100)."""
    valid = torch.ones(shape, dtype=torch.bool, device=device)  # [...]
    if mask is not None:
        valid = valid & mask.to(device=device, dtype=torch.bool)
    if labels is not None:
        valid = valid & (labels != IGNORE_INDEX)
    return valid


def _log_probs(logits: torch.Tensor, temperature: float, dtype) -> torch.Tensor:
    z = logits if dtype is None else logits.to(dtype)  # [..., V]
    return torch.log_softmax(z / temperature, dim=-1)  # [..., V]


def token_stats_ref(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    ref_logits: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = torch.float64,
):
    """Reference ``(logprobs, entropy, kl)``; logprobs is None without labels, kl without ref."""
    valid = _valid(logits.shape[:-1], labels, mask, logits.device)  # [...]
    logp = _log_probs(logits, temperature, dtype)  # [..., V]
    p = logp.exp()  # [..., V]
    live = p > 0  # [..., V]
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp_safe = torch.where(live, logp, zero)  # [..., V] (no 0 * -inf)
    entropy = -(p * logp_safe).sum(-1)  # [...]
    entropy = torch.where(valid, entropy, zero)
    lp = None
    if labels is not None:
        idx = labels.clamp(min=0).unsqueeze(-1)  # [..., 1]
        lp = logp.gather(-1, idx).squeeze(-1)  # [...]
        lp = torch.where(valid, lp, zero)
    kl = None
    if ref_logits is not None:
        logq = _log_probs(ref_logits, temperature, dtype)  # [..., V]
        diff = torch.where(live, logp - logq, zero)  # [..., V]
        kl = torch.where(valid, (p * diff).sum(-1), zero)  # [...]
    return lp, entropy, kl


def token_logprobs_ref(logits, labels, *, temperature=1.0, mask=None, dtype=torch.float64):
    """Reference log π(label) per position."""
    return token_stats_ref(logits, labels, temperature=temperature, mask=mask, dtype=dtype)[0]


def token_entropy_ref(logits, *, temperature=1.0, mask=None, dtype=torch.float64):
    """Reference entropy of softmax(logits / T) per position."""
    return token_stats_ref(logits, None, temperature=temperature, mask=mask, dtype=dtype)[1]


def token_kl_ref(logits, ref_logits, *, temperature=1.0, mask=None, dtype=torch.float64):
    """Reference exact KL(π ‖ π_ref) over the vocabulary per position."""
    out = token_stats_ref(logits, None, ref_logits, temperature=temperature, mask=mask, dtype=dtype)
    return out[2]


def linear_token_stats_ref(
    hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, **kw
):
    """Reference for the fused-linear op: ``hidden @ weight.T (+ bias)`` then the stats.

    The reference side defaults to the policy's hidden states / head (and bias, when the head
    is shared) for whichever of ``ref_hidden`` / ``ref_weight`` is missing; it gets no grad.
    """
    logits = hidden @ weight.T  # [..., V]
    if bias is not None:
        logits = logits + bias
    ref_logits = None
    if ref_hidden is not None or ref_weight is not None:
        with torch.no_grad():
            rh = hidden if ref_hidden is None else ref_hidden  # [..., H]
            ref_logits = rh @ (weight if ref_weight is None else ref_weight).T  # [..., V]
            if bias is not None and ref_weight is None:
                ref_logits = ref_logits + bias
    return token_stats_ref(logits, labels, ref_logits, **kw)
