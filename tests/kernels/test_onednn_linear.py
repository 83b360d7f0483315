"""oneDNN float32 linear layers (`rlhf_lightning.kernels.onednn_linear`): forward and backward
against the float64 reference, which calls it takes, the `linear` swap, the backend choice, and
the Lightning callback that opens the swap for a CPU run.

Error bound: 2.5 × torch's own float32 error (not the usual 2 ×): oneDNN accumulates each output
along K in one chain where MKL sums blocks; its relative RMS error measured 1.5 × MKL's at K = 576
and 2.06 × at K = 1536 (module docstring). The max-norm these tests compare passed at 2 × on the
AMD EPYC it was written on; 2.5 × leaves room for the other CPU's rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from rlhf_lightning.kernels import cpu_decode, onednn_linear
from rlhf_lightning.kernels.onednn_linear import (
    ENV_VAR,
    LARGE_WEIGHT_ELEMENTS,
    MIN_ROWS,
    MIN_ROWS_LARGE,
    MIN_WEIGHT_ELEMENTS,
    backend,
    onednn_linear_ref,
    onednn_linears,
    suits,
)
from torch import nn

from rlhf_lightning.modules.cpu_linear import OneDNNLinearCallback

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch was built without oneDNN"
)
FACTOR = 2.5  # see the module docstring

# (leading dims of x, outputs N, inputs K): rows not a multiple of any block, K = 576 / 1536 as
# in SmolLM2, an odd K and N, a 3-D input, a single row.
SHAPES = [
    ((37,), 1536, 576),
    ((5, 13), 576, 1536),
    ((1,), 333, 129),
    ((64,), 1031, 127),
    ((3, 7, 2), 200, 96),
]


def _inputs(lead, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)  # [..., K]
    w = torch.randn(n, k, generator=g) / k**0.5  # [N, K]
    b = torch.randn(n, generator=g)  # [N]
    return x, w, b


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
def test_forward_matches_float64(shape, threads, within_torch_error):
    torch.set_num_threads(threads)
    x, w, b = _inputs(*shape)
    for bias in (None, b):
        with torch.no_grad():
            ours = onednn_linear.onednn_linear(x, w, bias)  # [..., N]
        assert ours.dtype == torch.float32 and ours.shape == (*shape[0], shape[1])
        exact = onednn_linear_ref(x, w, bias)
        within_torch_error(ours, F.linear(x, w, bias), exact, name="y", factor=FACTOR)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
def test_backward_matches_float64(shape, within_torch_error):
    """dx, dW, db for a random upstream gradient, against float64 autograd."""
    x, w, b = _inputs(*shape)
    upstream = torch.randn(*shape[0], shape[1], generator=torch.Generator().manual_seed(1))
    grads = {}
    for name, fn, dtype in (
        ("ours", onednn_linear.onednn_linear, torch.float32),
        ("torch", F.linear, torch.float32),
        ("exact", F.linear, torch.float64),
    ):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
        fn(*leaves).backward(upstream.to(dtype))
        grads[name] = [t.grad for t in leaves]
    for i, label in enumerate(("dx", "dW", "db")):
        within_torch_error(
            grads["ours"][i], grads["torch"][i], grads["exact"][i], name=label, factor=FACTOR
        )


def _saved_shapes(fn) -> list[tuple]:
    """Shapes of the tensors autograd saves while `fn()` runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return shapes, out


def test_backward_saves_and_computes_only_what_is_needed():
    """A frozen weight (the reference model, a LoRA base): dx only, x not kept; a constant input:
    dW only, W not kept — as torch's linear."""
    x, w, _ = _inputs((19,), 300, 64)
    xg = x.clone().requires_grad_()
    saved, y = _saved_shapes(lambda: onednn_linear.onednn_linear(xg, w))
    assert saved == [(300, 64)]  # the weight only
    y.sum().backward()
    assert torch.allclose(xg.grad, torch.ones(19, 300) @ w, atol=1e-4)
    wg = w.clone().requires_grad_()
    saved, y = _saved_shapes(lambda: onednn_linear.onednn_linear(x, wg))
    assert saved == [(19, 64)]  # the input only
    y.sum().backward()
    assert torch.allclose(wg.grad, torch.ones(19, 300).t() @ x, atol=1e-4)


@pytest.mark.parametrize("lead", [(130,), (2, 65)])
def test_output_is_not_a_view_and_takes_in_place_updates(lead):
    """As on torch's linear: `y += 1` under autograd and a no-grad output updated later."""
    x, w, b = _inputs(lead, 256, 512)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = onednn_linear.onednn_linear(*leaves)
    y += 1.0
    y.sum().backward()
    assert torch.allclose(leaves[2].grad, torch.full((256,), float(x.numel() // 512)))
    with torch.no_grad():
        z = onednn_linear.onednn_linear(x, w, b)
    p = torch.zeros(256, requires_grad=True)
    z.add_(p)  # a no-grad result modified with grad on
    z.sum().backward()
    assert p.grad is not None


def test_suits_only_float32_cpu_calls_with_enough_rows_and_weight():
    x, w, b = _inputs((2, MIN_ROWS // 2), 512, 128)  # N·K = MIN_WEIGHT_ELEMENTS, MIN_ROWS rows
    assert w.numel() == MIN_WEIGHT_ELEMENTS and suits(x, w, b) and suits(x, w)
    assert not suits(x[:, :-1], w)  # one row fewer
    assert not suits(x, w[:-1])  # one weight row fewer (contiguous)
    big = torch.randn(LARGE_WEIGHT_ELEMENTS // 128, 128)  # a large weight from MIN_ROWS_LARGE rows
    assert suits(x[0, :MIN_ROWS_LARGE], big) and not suits(x[0, : MIN_ROWS_LARGE - 1], big)
    assert not suits(x.double(), w.double())
    assert not suits(x.bfloat16(), w.bfloat16())
    assert not suits(x, w.t().contiguous().t())  # a non-contiguous weight of the same size
    assert not suits(x[0, 0], w)  # 1-D input
    assert not suits(x, w, b[:10])  # F.linear's broadcasting bias shapes stay with torch
    assert not suits(x, w, torch.randn(1024)[::2])  # oneDNN would read a strided bias as dense
    assert not suits(x, w, torch.tensor(0.0).expand(512))
    assert not suits(torch.empty(0, 128), w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not suits(x, w)


def test_strided_bias_through_the_swap_matches_torch():
    layer_input, w, _ = _inputs((MIN_ROWS,), 512, 256)
    bias = torch.randn(1024)[::2]  # [512], stride 2
    with onednn_linears():
        ours = F.linear(layer_input, w, bias)
    assert torch.allclose(ours, _TORCH_LINEAR(layer_input, w, bias), atol=1e-4)


def test_swap_routes_nn_linear_and_restores(monkeypatch):
    layer = nn.Linear(256, 512)
    x = torch.randn(2, MIN_ROWS // 2, 256, requires_grad=True)
    calls = []
    real = onednn_linear.onednn_linear
    monkeypatch.setattr(onednn_linear, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    original = F.linear
    with onednn_linears():
        y = layer(x)  # through the swap
        small = nn.Linear(8, 8)(torch.randn(2, 8))  # not suited: torch's linear
    assert F.linear is original and len(calls) == 1 and small.shape == (2, 8)
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    with pytest.raises(RuntimeError, match="boom"), onednn_linears():
        raise RuntimeError("boom")
    assert F.linear is original
    with onednn_linears(enabled=False):
        assert F.linear is original


def test_swap_composes_with_the_decode_kernel_swap():
    """`generate` opens the decode swap inside a oneDNN run: each restores what it replaced."""
    original = F.linear
    with onednn_linears():
        swapped = F.linear
        with cpu_decode.fast_decode_linear():
            assert F.linear is not swapped
        assert F.linear is swapped
    assert F.linear is original


@pytest.mark.parametrize(
    ("cpuinfo", "machine", "expected"),
    [
        ("vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f\n", "x86_64", "onednn"),
        ("vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2\n", "x86_64", "torch"),
        ("vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f\n", "x86_64", "torch"),
        ("", "aarch64", "torch"),
    ],
)
def test_auto_backend_by_cpu(monkeypatch, tmp_path, cpuinfo, machine, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(cpuinfo)
    real_cpu_info = onednn_linear.cpu_info
    monkeypatch.setattr(onednn_linear, "cpu_info", lambda: real_cpu_info(info))
    monkeypatch.setattr(onednn_linear.platform, "machine", lambda: machine)
    onednn_linear._auto_backend.cache_clear()
    monkeypatch.delenv(ENV_VAR, raising=False)
    try:
        assert backend() == expected
    finally:
        onednn_linear._auto_backend.cache_clear()


def test_auto_backend_respects_onednn_limits(monkeypatch):
    """`ONEDNN_MAX_CPU_ISA` below AVX-512 (where oneDNN lost to MKL) or oneDNN switched off in
    torch: torch's linear even on an AMD CPU with AVX-512."""
    amd = ("AuthenticAMD", frozenset({"avx2", "avx512f"}))
    monkeypatch.setattr(onednn_linear, "cpu_info", lambda: amd)
    monkeypatch.setattr(onednn_linear.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv(ENV_VAR, raising=False)
    onednn_linear._auto_backend.cache_clear()
    try:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        assert backend() == "torch"
        onednn_linear._auto_backend.cache_clear()
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        assert backend() == "onednn"
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
        assert backend() == "torch"
    finally:
        onednn_linear._auto_backend.cache_clear()


def test_cpu_info_reads_vendor_and_flags(tmp_path):
    from rlhf_lightning.kernels.dispatch import cpu_info

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f\n")
    assert cpu_info(x86) == ("AuthenticAMD", frozenset({"fpu", "avx2", "avx512f"}))
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\n")
    assert cpu_info(arm) == ("", frozenset({"fp", "asimd", "sve"}))
    assert cpu_info(tmp_path / "missing") == ("", frozenset())


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, " Torch ")
    assert backend() == "torch"
    monkeypatch.setenv(ENV_VAR, "onednn")
    assert backend() == "onednn"
    monkeypatch.setenv(ENV_VAR, "mkl")
    with pytest.raises(ValueError, match="RLHF_CPU_MATMUL='mkl': use one of auto, onednn, torch"):
        backend()


class _Probe(nn.Module):
    """Records, in its forward, whether F.linear is swapped."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(512, 512)
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(F.linear is not _TORCH_LINEAR)
        return self.layer(x)


_TORCH_LINEAR = F.linear


def _fit_probe(tmp_path, fail: bool = False):
    from lightning.pytorch import LightningModule

    class Probe(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _Probe()

        def training_step(self, batch, batch_idx):
            if fail:
                raise RuntimeError("step failed")
            return self.net(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def configure_callbacks(self):
            return [OneDNNLinearCallback()]

    module = Probe()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    data = torch.utils.data.DataLoader([torch.randn(MIN_ROWS, 512) for _ in range(4)], batch_size=2)
    trainer.fit(module, train_dataloaders=data)
    return module.net.seen


@pytest.mark.parametrize(("setting", "swapped"), [("onednn", True), ("torch", False)])
def test_callback_swaps_for_the_run_only(monkeypatch, tmp_path, setting, swapped):
    monkeypatch.setenv(ENV_VAR, setting)
    assert _fit_probe(tmp_path) == [swapped, swapped]
    assert F.linear is _TORCH_LINEAR


def test_callback_restores_after_a_failed_run(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, "onednn")
    with pytest.raises(RuntimeError, match="step failed"):
        _fit_probe(tmp_path, fail=True)
    assert F.linear is _TORCH_LINEAR


def test_every_stage_module_adds_the_callback(tiny_config):
    from rlhf_lightning.models.loading import ModelSpec
    from rlhf_lightning.modules.sft import SFTModule

    module = SFTModule(model_spec=ModelSpec(config=tiny_config(32)))
    assert any(isinstance(cb, OneDNNLinearCallback) for cb in module.configure_callbacks())


def test_fused_lm_head_tiles_follow_the_swap(monkeypatch, within_torch_error):
    """`linear_token_stats` inside `onednn_linears`: logit tiles and d hidden on oneDNN, with
    log-probs, entropy, KL and every gradient within the bound of float64 autograd on logits."""
    from rlhf_lightning.kernels import linear_token_stats

    calls = []
    real = onednn_linear.matmul_nt
    monkeypatch.setattr(onednn_linear, "matmul_nt", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    rows, hidden, vocab = 37, 160, 5000  # one full tile of ≥ LARGE_WEIGHT_ELEMENTS, one partial
    h = torch.randn(rows, hidden, generator=g)
    w, w_ref = (torch.randn(vocab, hidden, generator=g) / hidden**0.5 for _ in range(2))
    labels = torch.randint(0, vocab, (rows,), generator=g)
    upstream = [torch.randn(rows, generator=g) for _ in range(3)]

    def run(dtype, fused: bool):
        hh, ww = (t.detach().to(dtype).requires_grad_() for t in (h, w))
        if fused:
            outs = linear_token_stats(hh, ww, labels, ref_hidden=h, ref_weight=w_ref)
        else:
            logits, ref = hh @ ww.t(), (h.to(dtype) @ w_ref.to(dtype).t()).detach()
            logp, ref_logp = logits.log_softmax(-1), ref.log_softmax(-1)
            outs = (
                logp.gather(-1, labels[:, None]).squeeze(-1),
                -(logp.exp() * logp).sum(-1),
                (logp.exp() * (logp - ref_logp)).sum(-1),
            )
        sum(o.double().mul(u.double()).sum() for o, u in zip(outs, upstream)).backward()
        return [o.detach() for o in outs] + [hh.grad, ww.grad]

    with onednn_linears():
        ours = run(torch.float32, fused=True)
    assert calls, "no tile ran on oneDNN"
    torch_own, exact = run(torch.float32, fused=False), run(torch.float64, fused=False)
    for name, a, b, c in zip(("logp", "entropy", "kl", "dh", "dW"), ours, torch_own, exact):
        within_torch_error(a, b, c, name=name, factor=FACTOR)
