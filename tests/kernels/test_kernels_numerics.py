"""Values and gradients of the token-statistics ops against the float64 torch reference.

Both backends (chunked torch, Triton through TRITON_INTERPRET=1 on CPU) run the shared
shape table from conftest.py with random upstream gradients.
"""

from __future__ import annotations

import pytest
import torch
from rlhf_lightning.kernels import reference as R
from rlhf_lightning.kernels import triton_token_stats as triton_stats

from rlhf_lightning import kernels as K


def _call(fn, z, zq, labels, mask, case, backend, reference=False, dtype=torch.float64):
    """Run op ``fn`` (ours or the reference) and return the tuple of its float outputs."""
    kw = {"temperature": case.temperature, "mask": mask}
    if reference:
        kw["dtype"] = dtype
        out = R.token_stats_ref(
            z,
            labels if fn in ("token_logprobs", "token_stats") else None,
            zq if fn in ("token_kl", "token_stats") else None,
            **kw,
        )
        picks = {"token_logprobs": (0,), "token_entropy": (1,), "token_kl": (2,)}
        return tuple(out[i] for i in picks.get(fn, (0, 1, 2)))
    kw["backend"] = backend
    if fn == "token_logprobs":
        return (K.token_logprobs(z, labels, **kw),)
    if fn == "token_entropy":
        return (K.token_entropy(z, **kw),)
    if fn == "token_kl":
        return (K.token_kl(z, zq, **kw),)
    return K.token_stats(z, labels, zq, **kw)


def _run(fn, case, backend, dtype, ref_dtype=torch.float64, reference=False):
    z, zq, labels, mask = case.make(dtype)
    z = z.clone().requires_grad_(True) if z.is_contiguous() else z.requires_grad_(True)
    zq = zq.requires_grad_(True)
    outs = _call(fn, z, zq, labels, mask, case, backend, reference, ref_dtype)
    g = torch.Generator().manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, generator=g).double()).sum() for o in outs)
    loss.backward()
    return [o.detach().double() for o in outs], z.grad, zq.grad


FUNCS = ["token_stats", "token_logprobs", "token_entropy", "token_kl"]


@pytest.mark.parametrize("fn", FUNCS)
def test_fp32_forward_backward_matches_float64_reference(fn, case, backend, tolerances):
    outs, dz, dzq = _run(fn, case, backend, torch.float32)
    z, zq, labels, mask = case.make(torch.float32)
    z64 = z.detach().double().requires_grad_(True)
    zq64 = zq.detach().double().requires_grad_(True)
    ref = _call(fn, z64, zq64, labels, mask, case, None, reference=True)
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g).double()).sum() for o in ref)
    loss.backward()
    atol, rtol = tolerances[torch.float32]
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r.detach(), atol=atol, rtol=rtol)
    assert dz.dtype == torch.float32
    torch.testing.assert_close(dz.double(), z64.grad, atol=atol, rtol=rtol)
    if fn in ("token_kl", "token_stats"):
        torch.testing.assert_close(dzq.double(), zq64.grad, atol=atol, rtol=rtol)
    else:
        assert dzq is None


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case_name", ["odd", "lead_dims_mask", "temperature"])
def test_low_precision_error_at_most_twice_torch_own(dtype, case_name, backend, case_table):
    case = case_table[case_name]
    ours, dz, dzq = _run("token_stats", case, backend, dtype)
    torch_own, tdz, tdzq = _run("token_stats", case, backend, dtype, None, reference=True)
    exact, edz, edzq = _run("token_stats", case, backend, dtype, torch.float64, reference=True)
    assert dz.dtype == dtype and dzq.dtype == dtype
    floor = 1e-6  # torch's own error can be exactly 0 on tiny rows
    for o, t, e in zip(ours, torch_own, exact):
        assert o.dtype == torch.float64  # (upcast here; the op returns float32)
        assert _err(o, e) <= 2 * _err(t, e) + floor
    assert _err(dz, edz) <= 2 * _err(tdz, edz) + floor
    assert _err(dzq, edzq) <= 2 * _err(tdzq, edzq) + floor


def test_outputs_float32_and_inputs_untouched(case, backend):
    z, zq, labels, mask = case.make(torch.bfloat16)
    z0, zq0 = z.clone(), zq.clone()
    z.requires_grad_(True)
    lp, ent, kl = K.token_stats(
        z, labels, zq, temperature=case.temperature, mask=mask, backend=backend
    )
    assert lp.dtype == ent.dtype == kl.dtype == torch.float32
    assert lp.shape == ent.shape == kl.shape == case.lead
    (lp.sum() + ent.sum() + kl.sum()).backward()
    assert z.grad.dtype == torch.bfloat16 and z.grad.shape == z.shape
    assert torch.equal(z.detach(), z0) and torch.equal(zq, zq0)
    valid = torch.ones(case.lead, dtype=torch.bool)
    if mask is not None:
        valid &= mask
    valid &= labels != -100
    for out in (lp, ent, kl):
        assert torch.all(out[~valid] == 0)
    assert torch.all(z.grad[~valid] == 0)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(kl).all()
    assert torch.isfinite(z.grad).all()


def test_triton_several_vocab_tiles(monkeypatch, case_cls):
    """Online recurrence across tiles, incl. tiles that are entirely -inf, V % block != 0."""
    monkeypatch.setattr(triton_stats, "BLOCK_V_OVERRIDE", 64)
    case = case_cls("tiles", (5,), 300, temperature=0.8, neginf=True, ignore=True)
    z, zq, labels, _ = case.make(torch.float32)
    z = z.clone()
    z[:, 64:128] = float("-inf")  # the whole second tile
    zq = torch.where(torch.isinf(z), z, zq)
    z.requires_grad_(True)
    ours = K.token_stats(z, labels, zq, temperature=0.8, backend="triton")
    z64 = z.detach().double().requires_grad_(True)
    ref = R.token_stats_ref(z64, labels, zq.double(), temperature=0.8)
    gs = [torch.randn(5) for _ in range(3)]
    sum((o * g).sum() for o, g in zip(ours, gs)).backward()
    sum((o * g.double()).sum() for o, g in zip(ref, gs)).backward()
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z.grad.double(), z64.grad, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64_torch_path():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    zq = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3), generator=g)
    labels[0, 1] = -100
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False

    def fn(a, b):
        return K.token_stats(a, labels, b, temperature=0.8, mask=mask, backend="torch")

    assert torch.autograd.gradcheck(fn, (z, zq), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda a: K.token_entropy(a, temperature=1.3, backend="torch"), (z,), eps=1e-6
    )
    assert torch.autograd.gradcheck(
        lambda a: K.token_logprobs(a, labels, backend="torch"), (z,), eps=1e-6
    )
