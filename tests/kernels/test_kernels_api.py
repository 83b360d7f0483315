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


def _linear_inputs(lead, vocab, kw):
    """Float32 inputs of the fused-linear test: ``(leaves, labels, mask, hq, wq)``."""
    g = torch.Generator().manual_seed(5)
    width = 24
    h = torch.randn(*lead, width, generator=g)  # [..., H]
    w = torch.randn(vocab, width, generator=g) * 0.4  # [V, H]
    b = None
    if kw.get("bias"):
        b = torch.randn(vocab, generator=g)  # [V]
        if kw.get("neginf_tile"):
            b[64:128] = float("-inf")  # a whole vocabulary tile is masked out
    labels = torch.randint(0, vocab, lead, generator=g)
    if kw.get("neginf_tile"):
        labels = labels % 64
    if kw.get("ignore"):
        labels.view(-1)[::4] = -100
    mask = (torch.rand(lead, generator=g) > 0.3) if kw.get("mask") else None
    hq = torch.randn(*lead, width, generator=g) if kw.get("ref_hidden") else None
    wq = torch.randn(vocab, width, generator=g) * 0.4 if kw.get("ref_weight") else None
    return [h, w, b], labels, mask, hq, wq


def _linear_run(mode, leaves, labels, mask, hq, wq, kw):
    """``(outputs, grads of h, w[, b])`` of ours / torch's own float32 / the float64 reference."""
    dtype = torch.float64 if mode == "exact" else torch.float32
    h, w, b = (None if x is None else x.detach().to(dtype).requires_grad_(True) for x in leaves)
    hq, wq = (None if x is None else x.to(dtype) for x in (hq, wq))
    t = kw.get("temperature", 1.0)
    common = {"bias": b, "ref_hidden": hq, "ref_weight": wq, "temperature": t, "mask": mask}
    if mode == "ours":
        outs = linear_token_stats(h, w, labels, chunk_size=kw.get("chunk_size"), **common)
    else:  # the reference in the inputs' own dtype: float64 (exact) or float32 (torch's own)
        outs = R.linear_token_stats_ref(h, w, labels, dtype=None, **common)
    live = [x for x in (h, w, b) if x is not None]
    grads = torch.autograd.grad(_grads([o for o in outs if o is not None]), live)
    return outs, grads


@pytest.mark.parametrize(
    "lead,vocab,kw",
    [
        ((37,), 1031, {}),
        ((3, 11), 300, {"temperature": 0.7, "bias": True, "ref_hidden": True, "mask": True}),
        ((29,), 257, {"ref_weight": True, "ignore": True, "chunk_size": 7, "tile": 64}),
        ((9,), 200, {"bias": True, "ref_hidden": True, "neginf_tile": True, "tile": 64}),
    ],
)
def test_linear_token_stats_matches_matmul_then_reference(
    lead, vocab, kw, monkeypatch, budget, within_torch_error
):
    """Within twice the error of torch's own float32 `hidden @ W.T` + log_softmax."""
    monkeypatch.setattr(linear, "TILE_V", kw.get("tile", linear.TILE_V))
    leaves, labels, mask, hq, wq = _linear_inputs(lead, vocab, kw)
    ours, grads = _linear_run("ours", leaves, labels, mask, hq, wq, kw)
    own, own_grads = _linear_run("torch", leaves, labels, mask, hq, wq, kw)
    ref, ref_grads = _linear_run("exact", leaves, labels, mask, hq, wq, kw)
    assert (ours[2] is None) == (hq is None and wq is None)
    for name, o, t, r in zip(("logprobs", "entropy", "kl"), ours, own, ref):
        if o is not None:
            assert o.dtype == torch.float32 and o.shape == lead
            within_torch_error(o, t, r, name=name, **budget(torch.float32))
    live = [x for x in leaves if x is not None]
    for name, gr, gt, rr, leaf in zip(
        ("d_hidden", "d_weight", "d_bias"), grads, own_grads, ref_grads, live
    ):
        assert gr.dtype == leaf.dtype and gr.shape == leaf.shape
        within_torch_error(gr, gt, rr, name=name, **budget(torch.float32))


def test_linear_bf16_error_at_most_twice_torch_own(budget, within_torch_error):
    g = torch.Generator().manual_seed(6)
    h = torch.randn(40, 32, generator=g).bfloat16()
    w = (torch.randn(500, 32, generator=g) * 0.3).bfloat16()
    hq = torch.randn(40, 32, generator=g).bfloat16()
    labels = torch.randint(0, 500, (40,), generator=g)
    exact = R.linear_token_stats_ref(h.double(), w.double(), labels, ref_hidden=hq.double())
    own = R.linear_token_stats_ref(h, w, labels, ref_hidden=hq, dtype=None)
    ours = linear_token_stats(h, w, labels, ref_hidden=hq)
    for name, o, t, e in zip(("logprobs", "entropy", "kl"), ours, own, exact):
        within_torch_error(o, t, e, name=name, **budget(torch.bfloat16))


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


def test_vocab_262144_and_huge_logits(backend, budget, within_torch_error):
    """V = 262144 with |z| ≈ 1e4 and -inf entries. torch's own float32 entropy here is off by
    7.5e-5 with AVX-512 ATen kernels and 1.85e-4 with AVX2 ones (reduction order), so a fixed
    tolerance cannot be CPU-independent; the 2× rule is.

    The chunked backward renormalises p (rows summing to 1 in float32); without that its entropy
    term p ⊙ (log p + H) carried the log-sum-exp rounding at about 2× torch's own error.
    """
    g = torch.Generator().manual_seed(7)
    v = 262144
    z = torch.randn(2, v, generator=g) * 3  # [2, V]
    z[1] += 1e4
    z[0, :1000] = float("-inf")
    zq = z + torch.randn(2, v, generator=g)  # [2, V]
    labels = torch.tensor([5000, 7])
    runs = {}
    for mode in ("ours", "torch", "exact"):
        leaf = (z.double() if mode == "exact" else z.clone()).requires_grad_(True)
        zq_mode = zq.double() if mode == "exact" else zq
        if mode == "ours":
            outs = K.token_stats(leaf, labels, zq_mode, backend=backend)
        else:
            dtype = torch.float64 if mode == "exact" else None
            outs = R.token_stats_ref(leaf, labels, zq_mode, dtype=dtype)
        _grads(outs).backward()
        runs[mode] = [*outs, leaf.grad]
    names = ("logprobs", "entropy", "kl", "dz")
    for name, o, t, e in zip(names, runs["ours"], runs["torch"], runs["exact"]):
        within_torch_error(o, t, e, name=name, **budget(torch.float32, backend))


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


def test_shared_logits_several_losses_match_reference(budget, within_torch_error):
    """Two ops on the same logits in one loss: their gradients add up like the reference's."""
    z = torch.randn(5, 40)  # [N, V]
    labels = torch.randint(0, 40, (5,))
    grads = {}
    for mode in ("ours", "torch", "exact"):
        leaf = (z.double() if mode == "exact" else z.clone()).requires_grad_(True)
        if mode == "ours":
            loss = (
                K.token_logprobs(leaf, labels).sum()
                + 0.1 * K.token_entropy(leaf, temperature=0.5).sum()
            )
        else:
            dtype = torch.float64 if mode == "exact" else None
            loss = (
                R.token_logprobs_ref(leaf, labels, dtype=dtype).sum()
                + 0.1 * R.token_entropy_ref(leaf, temperature=0.5, dtype=dtype).sum()
            )
        loss.backward()
        grads[mode] = leaf.grad
    within_torch_error(
        grads["ours"], grads["torch"], grads["exact"], name="dz", **budget(torch.float32)
    )


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


def test_linear_token_stats_has_no_backend(monkeypatch):
    """Torch tiles on every device: no `backend=` argument, and the env var does not apply."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g)  # [N, H], [V, H]
    labels = torch.randint(0, 11, (5,), generator=g)  # [N]
    with pytest.raises(TypeError, match="backend"):
        linear_token_stats(h, w, labels, backend="torch")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    plain = linear_token_stats(h, w, labels, ref_hidden=h * 0.5)
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")  # would raise in the token_* functions
    ignored = linear_token_stats(h, w, labels, ref_hidden=h * 0.5)
    for a, b in zip(plain, ignored):
        assert torch.equal(a, b)


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
