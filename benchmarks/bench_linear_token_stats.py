"""Benchmark providers for the fused-linear op (hidden states → logp + entropy + KL).

* ``naive``   — ``logits = hidden @ W.T`` and ``ref_logits = ref_hidden @ W_ref.T`` (no grad)
  materialised, then the full-vocabulary torch statistics.
* ``chunked`` — ``rlhf_lightning.kernels.linear_token_stats`` (vocabulary tiles, logits
  never materialised, recomputed in backward).
* ``triton``  — the same op on a CUDA device (GPU only).
"""

from __future__ import annotations

import torch
from rlhf_lightning.kernels import linear_token_stats

from .bench_token_stats import naive_stats

PROVIDERS = ["naive", "chunked", "triton"]


def make(provider, n, vocab, hidden, dtype, device, seed=0):
    """Inputs and the op for one case; returns ``(fn, inputs_to_grad, bytes_min)``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=dtype).to(device)  # [N, H]
    hq = torch.randn(n, hidden, generator=g, dtype=dtype).to(device)  # [N, H]
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(dtype).to(device)  # [V, H]
    wq = (w.float() + 0.01 * torch.randn(vocab, hidden, generator=g)).to(dtype).to(device)
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)  # [N]
    h.requires_grad_(True)
    w.requires_grad_(True)

    if provider == "naive":

        def fn():
            logits = h @ w.T  # [N, V]
            with torch.no_grad():
                ref_logits = hq @ wq.T  # [N, V]
            return naive_stats(logits, labels, ref_logits)

    else:

        def fn():
            return linear_token_stats(h, w, labels, ref_hidden=hq, ref_weight=wq)

    elem = h.element_size()
    # minimum traffic: weights read (policy + ref) forward; weights read + dW written backward
    bytes_min = {"forward": 2 * vocab * hidden * elem, "backward": 3 * vocab * hidden * elem}
    bytes_min["full"] = bytes_min["forward"] + bytes_min["backward"]
    return fn, [h, w], bytes_min
