"""Benchmark providers for token statistics on materialised logits (logp + entropy + KL).

Providers (each returns ``(logprobs, entropy, kl)`` from ``logits [N, V]``):

* ``naive``   — full-vocabulary torch: log_softmax → gather, exp → entropy, KL over V.
* ``trl``     — a TRL-style torch path written for this benchmark: a per-sequence
  log-sum-exp loop for the selected-token log-prob, row-chunked log_softmax for the
  entropy and the same chunking for the exact KL (the structure of TRL's
  ``selective_log_softmax`` + ``entropy_from_logits``; not their code).
* ``chunked`` — ``rlhf_lightning.kernels.token_stats(backend="torch")``.
* ``triton``  — ``rlhf_lightning.kernels.token_stats(backend="triton")`` (GPU only).
"""

from __future__ import annotations

import torch
from rlhf_lightning.kernels import token_stats

PROVIDERS = ["naive", "trl", "chunked", "triton"]
TRL_SEQ_LEN = 256  # tokens per sequence row for the TRL-style per-sequence loop
TRL_CHUNK = 128  # rows per chunk for the TRL-style entropy / KL


def naive_stats(logits, labels, ref_logits, temperature=1.0):
    """Full-vocabulary torch reference: materialises several ``[N, V]`` float32 tensors."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [N, V]
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [N]
    p = logp.exp()  # [N, V]
    ent = -(p * logp).sum(-1)  # [N]
    logq = torch.log_softmax(ref_logits.float() / temperature, dim=-1)  # [N, V]
    kl = (p * (logp - logq)).sum(-1)  # [N]
    return lp, ent, kl


def trl_style_stats(logits, labels, ref_logits, temperature=1.0):
    """TRL-style torch path: per-sequence lse loop + row-chunked entropy and KL."""
    z = logits if temperature == 1.0 else logits / temperature  # [N, V]
    zq = ref_logits if temperature == 1.0 else ref_logits / temperature  # [N, V]
    picked = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [N]
    lse = torch.cat([torch.logsumexp(seq, dim=-1) for seq in z.split(TRL_SEQ_LEN)])  # [N]
    lp = picked - lse  # [N]
    ents, kls = [], []
    for c in z.split(TRL_CHUNK):
        logp = torch.log_softmax(c.float(), dim=-1)  # [C, V]
        p = logp.exp()  # [C, V]
        ents.append(-(p * logp).sum(-1))
    for c, cq in zip(z.split(TRL_CHUNK), zq.split(TRL_CHUNK)):
        logp = torch.log_softmax(c.float(), dim=-1)  # [C, V]
        logq = torch.log_softmax(cq.float(), dim=-1)  # [C, V]
        kls.append((logp.exp() * (logp - logq)).sum(-1))
    return lp, torch.cat(ents), torch.cat(kls)


def fused_stats(backend):
    def fn(logits, labels, ref_logits, temperature=1.0):
        return token_stats(logits, labels, ref_logits, temperature=temperature, backend=backend)

    return fn


def make(provider, n, vocab, hidden, dtype, device, seed=0):
    """Inputs and the op for one case; returns ``(fn, inputs_to_grad, bytes_min)``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g, dtype=dtype) * 2).to(device)  # [N, V]
    ref = (logits.float() + torch.randn(n, vocab, generator=g)).to(dtype).to(device)  # [N, V]
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)  # [N]
    logits.requires_grad_(True)
    op = {
        "naive": naive_stats,
        "trl": trl_style_stats,
        "chunked": fused_stats("torch"),
        "triton": fused_stats("triton"),
    }[provider]

    def fn():
        return op(logits, labels, ref)

    elem = logits.element_size()
    # minimum traffic: read logits + ref once (fwd); read both + write dlogits once (bwd)
    bytes_min = {"forward": 2 * n * vocab * elem, "backward": 3 * n * vocab * elem}
    bytes_min["full"] = bytes_min["forward"] + bytes_min["backward"]
    return fn, [logits], bytes_min
