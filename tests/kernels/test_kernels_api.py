"""Fused-linear op, edge cases, input validation, backend dispatch and kl_penalty."""

from __future__ import annotations

import pytest
import rlhf_lightning.kernels as K
import torch
from rlhf_lightning.kernels import dispatch, kl_penalty, linear, linear_token_stats
from rlhf_lightning.kernels import reference as R


def _grads(outs, seed=2):
    g = torch.Generator().manual_seed(seed)
    return sum((o.double() * torch.randn(o.shape, generator=g).double()).sum() for o in outs)


@pytest.mark.parametrize(
    "lead,vocab,kw",
    [
        ((37,), 1031, {}),
        ((3, 11), 300, {"temperature": 0.7, "bias": True, "ref_hidden": True, "mask": True}),
        ((29,), 257, {"ref_weight": True, "ignore": True, "chunk_size": 7, "tile": 64}),
        ((9,), 200, {"bias": True, "ref_hidden": True, "neginf_tile": True, "tile": 64}),
    ],
)
def test_linear_token_stats_matches_matmul_then_reference(lead, vocab, kw, monkeypatch):
    monkeypatch.setattr(linear, "TILE_V", kw.get("tile", linear.TILE_V))
    g = torch.Generator().manual_seed(5)
    width = 24
    h = torch.randn(*lead, width, generator=g, requires_grad=True)
    w = (torch.randn(vocab, width, generator=g) * 0.4).requires_grad_(True)
    b = None
    if kw.get("bias"):
        b = torch.randn(vocab, generator=g)
        if kw.get("neginf_tile"):
            b[64:128] = float("-inf")  # a whole vocabulary tile is masked out
        b.requires_grad_(True)
    labels = torch.randint(0, vocab, lead, generator=g)
    if kw.get("neginf_tile"):
        labels = labels % 64
    if kw.get("ignore"):
        labels.view(-1)[::4] = -100
    mask = (torch.rand(lead, generator=g) > 0.3) if kw.get("mask") else None
    hq = torch.randn(*lead, width, generator=g) if kw.get("ref_hidden") else None
    wq = torch.randn(vocab, width, generator=g) * 0.4 if kw.get("ref_weight") else None
    t = kw.get("temperature", 1.0)
    ours = linear_token_stats(
        h,
        w,
        labels,
        bias=b,
        ref_hidden=hq,
        ref_weight=wq,
        temperature=t,
        mask=mask,
        chunk_size=kw.get("chunk_size"),
    )
    leaves = [x for x in (h, w, b) if x is not None]
    grads = torch.autograd.grad(_grads([o for o in ours if o is not None]), leaves)
    leaves64 = [x.detach().double().requires_grad_(True) for x in leaves]
    h64, w64 = leaves64[:2]
    b64 = leaves64[2] if b is not None else None
    ref = R.linear_token_stats_ref(
        h64,
        w64,
        labels,
        bias=b64,
        ref_hidden=None if hq is None else hq.double(),
        ref_weight=None if wq is None else wq.double(),
        temperature=t,
        mask=mask,
    )
    ref_grads = torch.autograd.grad(_grads([o for o in ref if o is not None]), leaves64)
    assert (ours[2] is None) == (hq is None and wq is None)
    for o, r in zip(ours, ref):
        if o is not None:
            assert o.dtype == torch.float32 and o.shape == lead
            torch.testing.assert_close(o.double(), r.detach(), atol=1e-5, rtol=1e-5)
    for gr, rr, leaf in zip(grads, ref_grads, leaves):
        assert gr.dtype == leaf.dtype and gr.shape == leaf.shape
        torch.testing.assert_close(gr.double(), rr, atol=2e-5, rtol=1e-5)


def test_linear_bf16_error_at_most_twice_torch_own():
    g = torch.Generator().manual_seed(6)
    h = torch.randn(40, 32, generator=g).bfloat16()
    w = (torch.randn(500, 32, generator=g) * 0.3).bfloat16()
    hq = torch.randn(40, 32, generator=g).bfloat16()
    labels = torch.randint(0, 500, (40,), generator=g)
    exact = R.linear_token_stats_ref(h.double(), w.double(), labels, ref_hidden=hq.double())
    own = R.linear_token_stats_ref(h, w, labels, ref_hidden=hq, dtype=None)
    ours = linear_token_stats(h, w, labels, ref_hidden=hq)
    for o, t, e in zip(ours, own, exact):
        err_ours = (o.double() - e).abs().max().item()
        assert err_ours <= 2 * (t.double() - e).abs().max().item() + 1e-6


def test_linear_reference_side_gets_no_gradient_and_masked_rows_skip():
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    hq = torch.randn(6, 8, requires_grad=True)
    mask = torch.tensor([True, False, True, True, False, True])
    lp, ent, kl = linear_token_stats(
        h, w, torch.zeros(6, dtype=torch.long), ref_hidden=hq, mask=mask
    )
    (lp.sum() + ent.sum() + kl.sum()).backward()
    assert hq.grad is None
    assert torch.all(h.grad[~mask] == 0) and torch.all(lp[~mask] == 0)


def test_vocab_262144_and_huge_logits(backend):
    g = torch.Generator().manual_seed(7)
    v = 262144
    z = torch.randn(2, v, generator=g) * 3
    z[1] += 1e4
    z[0, :1000] = float("-inf")
    zq = z + torch.randn(2, v, generator=g)
    labels = torch.tensor([5000, 7])
    z.requires_grad_(True)
    ours = K.token_stats(z, labels, zq, backend=backend)
    z64 = z.detach().double().requires_grad_(True)
    ref = R.token_stats_ref(z64, labels, zq.double())
    _grads(ours).backward()
    _grads(ref).backward()
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z.grad.double(), z64.grad, atol=1e-5, rtol=1e-5)


def test_masked_rows_do_no_vocab_work_and_all_masked(backend):
    z = torch.randn(4, 33)
    z[1] = float("nan")  # a masked row is never read
    z.requires_grad_(True)
    mask = torch.tensor([True, False, True, True])
    lp, ent, kl = K.token_stats(z, torch.arange(4), z.detach() * 0.5, mask=mask, backend=backend)
    (lp.sum() + ent.sum() + kl.sum()).backward()
    assert torch.isfinite(z.grad).all() and torch.all(z.grad[1] == 0)
    assert lp[1] == 0 and ent[1] == 0 and kl[1] == 0 and torch.isfinite(lp).all()
    z2 = torch.randn(3, 10, requires_grad=True)
    out = K.token_logprobs(z2, torch.full((3,), -100), backend=backend)
    out.sum().backward()
    assert torch.all(out == 0) and torch.all(z2.grad == 0)


def test_shared_logits_several_losses_match_reference():
    z = torch.randn(5, 40, requires_grad=True)
    labels = torch.randint(0, 40, (5,))
    loss = K.token_logprobs(z, labels).sum() + 0.1 * K.token_entropy(z, temperature=0.5).sum()
    loss.backward()
    z64 = z.detach().double().requires_grad_(True)
    ref = (
        R.token_logprobs_ref(z64, labels).sum()
        + 0.1 * R.token_entropy_ref(z64, temperature=0.5).sum()
    )
    ref.backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_one_line_errors():
    z = torch.randn(2, 3, 10)
    labels = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="labels.*outside \\[0, 10\\)"):
        K.token_logprobs(z, labels + 10)
    with pytest.raises(ValueError, match="labels.*shape"):
        K.token_logprobs(z, labels[0])
    with pytest.raises(ValueError, match="mask.*shape"):
        K.token_entropy(z, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="ref_logits.*shape"):
        K.token_kl(z, z[:, :, :5])
    with pytest.raises(ValueError, match="temperature"):
        K.token_entropy(z, temperature=0.0)
    with pytest.raises(TypeError, match="logits"):
        K.token_entropy(z.long())
    with pytest.raises(TypeError, match="labels.*integer"):
        K.token_logprobs(z, labels.float())
    with pytest.raises(ValueError, match="backend="):
        K.token_entropy(z, backend="cuda-magic")
    with pytest.raises(ValueError, match="weight"):
        linear_token_stats(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    # labels outside the vocabulary are fine where the mask drops the position
    out = K.token_logprobs(z, labels + 99, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.all(out == 0)


def test_backend_resolution(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve_backend(x) == "chunked"
    assert dispatch.resolve_backend(x, "torch") == "chunked"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.resolve_backend(x) == "triton"  # interpreter on in tests
    assert dispatch.resolve_backend(x, "chunked") == "chunked"  # argument wins
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="RLHF_KERNEL_BACKEND"):
        dispatch.resolve_backend(x)
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        dispatch.resolve_backend(x, "triton")


def test_kl_penalty_estimators():
    lp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.5])
    r = ref - lp.detach()
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), -r)
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), 0.5 * r**2)
    k3 = kl_penalty(lp, ref, "k3")
    torch.testing.assert_close(k3, torch.exp(r) - 1 - r)
    assert torch.all(k3 >= 0) and k3.dtype == torch.float32
    k3.sum().backward()
    torch.testing.assert_close(lp.grad, 1 - torch.exp(r))  # d/dlp (e^r - 1 - r), r = ref - lp
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(lp, ref, "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(lp, ref[:2])


def test_public_api_documented():
    for name in K.__all__:
        fn = getattr(K, name)
        assert callable(fn) and fn.__doc__ and len(fn.__doc__) > 80, name


def test_enclosing_autocast_does_not_change_results(backend):
    """Lightning's bf16-mixed runs losses under torch.autocast: the kernels switch it off inside
    (forward and backward), so values, dtypes and gradients equal the autocast-free ones."""
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(5, 7, 131, generator=g) * 3).requires_grad_(True)  # [B, T, V]
    zq = torch.randn(5, 7, 131, generator=g) * 3
    labels = torch.randint(0, 131, (5, 7), generator=g)
    h = torch.randn(6, 16, generator=g, requires_grad=True)  # [N, H]
    w = torch.randn(131, 16, generator=g, requires_grad=True)  # [V, H]
    labels_h = torch.randint(0, 131, (6,), generator=g)  # [N]

    def run():
        stats = K.token_stats(z, labels, zq, temperature=0.8, backend=backend)
        fused = linear_token_stats(h, w, labels_h, ref_hidden=h.detach() * 0.9)
        outs = [*stats, *fused]
        grads = torch.autograd.grad(_grads(outs), [z, h, w])
        return [o.detach() for o in outs], grads

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run()
    for a, b in zip(plain[0] + list(plain[1]), mixed[0] + list(mixed[1])):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b)
