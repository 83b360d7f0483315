"""Values and gradients of the token-statistics ops against the float64 torch reference.

Both backends (chunked torch, Triton through TRITON_INTERPRET=1 on CPU) run the shared
shape table from conftest.py with random upstream gradients. Every dtype is judged the same way
(`within_torch_error`, tests/conftest.py): the error against float64 is at most twice torch's
own error when it computes the plain log_softmax / softmax in the input dtype, plus a small slack
(`error_budget`, tests/kernels/conftest.py) — never a fixed tolerance, which would depend on the
CPU's vector width and the thread count through the reduction order.
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


def _run(fn, case, backend, dtype, mode):
    """Outputs and input gradients of ``fn`` on the case's ``dtype`` inputs.

    ``mode``: "ours" (the op), "torch" (the reference computed in ``dtype`` itself: torch's own
    error) or "exact" (the reference on float64 copies of the same inputs). The upstream
    gradient is the same random one in every mode. Returns ``(outs, dz, dzq)``; dzq is None
    when ``fn`` does not read ``ref_logits``.
    """
    z, zq, labels, mask = case.make(dtype)
    if mode == "exact":
        z, zq = z.detach().double(), zq.detach().double()
    z = z.clone().requires_grad_(True) if z.is_contiguous() else z.requires_grad_(True)
    zq = zq.requires_grad_(True)
    ref_dtype = {"torch": None, "exact": torch.float64}.get(mode)
    outs = _call(fn, z, zq, labels, mask, case, backend, mode != "ours", ref_dtype)
    g = torch.Generator().manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, generator=g).double()).sum() for o in outs)
    loss.backward()
    return [o.detach().double() for o in outs], z.grad, zq.grad


def _check_all(within, ours, own, exact, dtype, backend, budget):
    """Every output and gradient of ``ours`` within twice torch's own error of ``exact``."""
    for i, (o, t, e) in enumerate(zip(ours[0], own[0], exact[0])):
        within(o, t, e, name=f"output {i}", **budget(dtype, backend))
    for name, k in (("dz", 1), ("dzq", 2)):
        assert (ours[k] is None) == (exact[k] is None), name
        if ours[k] is not None:
            within(ours[k], own[k], exact[k], name=name, **budget(dtype, backend, stored=True))


FUNCS = ["token_stats", "token_logprobs", "token_entropy", "token_kl"]


@pytest.mark.parametrize("fn", FUNCS)
def test_fp32_forward_backward_within_twice_torch_error(
    fn, case, backend, budget, within_torch_error
):
    ours = _run(fn, case, backend, torch.float32, "ours")
    own = _run(fn, case, backend, torch.float32, "torch")
    exact = _run(fn, case, backend, torch.float32, "exact")
    assert ours[1].dtype == torch.float32
    assert (ours[2] is None) == (fn not in ("token_kl", "token_stats"))
    _check_all(within_torch_error, ours, own, exact, torch.float32, backend, budget)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case_name", ["odd", "lead_dims_mask", "temperature"])
def test_low_precision_error_at_most_twice_torch_own(
    dtype, case_name, backend, case_table, budget, within_torch_error
):
    case = case_table[case_name]
    ours = _run("token_stats", case, backend, dtype, "ours")
    own = _run("token_stats", case, backend, dtype, "torch")
    exact = _run("token_stats", case, backend, dtype, "exact")
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    _check_all(within_torch_error, ours, own, exact, dtype, backend, budget)


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


def test_triton_several_vocab_tiles(monkeypatch, case_cls, budget, within_torch_error):
    """Online recurrence across tiles, incl. tiles that are entirely -inf, V % block != 0."""
    monkeypatch.setattr(triton_stats, "BLOCK_V_OVERRIDE", 64)
    case = case_cls("tiles", (5,), 300, temperature=0.8, neginf=True, ignore=True)
    z, zq, labels, _ = case.make(torch.float32)
    z = z.clone()
    z[:, 64:128] = float("-inf")  # the whole second tile
    zq = torch.where(torch.isinf(z), z, zq)
    outs = {}
    for mode, leaf in (("ours", z), ("torch", z), ("exact", z.double())):
        leaf = leaf.detach().clone().requires_grad_(True)
        zq_mode = zq.double() if mode == "exact" else zq
        if mode == "ours":
            stats = K.token_stats(leaf, labels, zq_mode, temperature=0.8, backend="triton")
        else:
            dtype = torch.float64 if mode == "exact" else None
            stats = R.token_stats_ref(leaf, labels, zq_mode, temperature=0.8, dtype=dtype)
        g = torch.Generator().manual_seed(4)
        sum((o.double() * torch.randn(5, generator=g).double()).sum() for o in stats).backward()
        outs[mode] = [*stats, leaf.grad]
    names = ("logprobs", "entropy", "kl", "dz")
    for name, o, t, e in zip(names, outs["ours"], outs["torch"], outs["exact"]):
        within_torch_error(o, t, e, name=name, **budget(torch.float32, "triton"))


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
