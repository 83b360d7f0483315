"""The CPU decode kernel (`rlhf_lightning.kernels.cpu_decode`): float32 y = x · Wᵀ + b for a few
rows, against the float64 reference within 2 × torch's own float32 error; which calls it takes;
the `linear` swap; the fallback when it cannot be built; `generate` with it on and off.

The kernel is built on first use (~30 s, cached). Without a C++ compiler on PATH the tests that
need it skip; with one, a failed build fails them."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from rlhf_lightning.kernels import cpu_decode
from rlhf_lightning.kernels.cpu_decode import (
    MAX_ROWS,
    MIN_WEIGHT_ELEMENTS,
    decode_linear,
    decode_linear_ref,
    fast_decode_linear,
    suits,
)
from torch import nn
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_lightning.ppo.generation import generate

# (rows M, outputs N, inputs K): every tile path — M below, at and above the 8-row tile, N not a
# multiple of the 3-row tile, K with a tail below 16 and K shorter than one vector.
SHAPES = [
    (1, 300, 257),
    (3, 17, 100),
    (8, 576, 576),
    (13, 1000, 96),
    (16, 4099, 64),
    (5, 7, 15),
]


@pytest.fixture(scope="module")
def built():
    """The kernel module; skips only when no C++ compiler is on PATH."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on PATH: the CPU decode kernel cannot be built here")
    ext = cpu_decode.extension()
    assert ext is not None, "a C++ compiler is on PATH but the CPU decode kernel did not build"
    return ext


def _inputs(m: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)  # [M, K]
    w = torch.randn(n, k, generator=g) / k**0.5  # [N, K]
    b = torch.randn(n, generator=g)  # [N]
    return x, w, b


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_within_torch_error(built, shape, threads, within_torch_error):
    """With and without bias, on 1 and 2 threads (the split of W's rows between threads)."""
    torch.set_num_threads(threads)
    x, w, b = _inputs(*shape)
    for bias in (None, b):
        ours = decode_linear(x, w, bias)  # [M, N]
        assert ours.dtype == torch.float32 and ours.shape == (shape[0], shape[1])
        within_torch_error(ours, F.linear(x, w, bias), decode_linear_ref(x, w, bias), name="y")


@pytest.fixture(scope="module")
def built_avx2(built):
    """The kernel compiled for x86-64-v3 (AVX2 + FMA, no AVX-512): its 8-float tile, which
    -march=native does not select on an AVX-512 machine. Skips on CPUs without AVX2/FMA."""
    from pathlib import Path

    from torch.utils import cpp_extension

    flags = next(
        (ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")),
        "",
    ).split()
    if not {"avx2", "fma"} <= set(flags):
        pytest.skip("this CPU has no AVX2/FMA: the x86-64-v3 build cannot run here")
    return cpp_extension.load(
        cpu_decode._build_name() + "_x86_64_v3",
        sources=[str(cpu_decode._SOURCE)],
        extra_cflags=["-O3", "-march=x86-64-v3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_avx2_tile_matches_float64(built_avx2, shape, within_torch_error):
    """The non-AVX-512 branch of decode_linear.cpp, on 2 threads, with bias."""
    torch.set_num_threads(2)
    x, w, b = _inputs(*shape)
    ours = built_avx2.decode_linear(x, w, b)  # [M, N]
    within_torch_error(ours, F.linear(x, w, b), decode_linear_ref(x, w, b), name="y")


def test_leading_dims_and_strided_input(built, within_torch_error):
    """x [b, 1, K] (a decode step's hidden states) and a transposed x: shapes as `F.linear`'s."""
    x, w, b = _inputs(8, 200, 64, seed=1)
    x3 = x.view(8, 1, 64)
    ours = decode_linear(x3, w, b)
    assert ours.shape == (8, 1, 200)
    within_torch_error(ours, F.linear(x3, w, b), decode_linear_ref(x3, w, b), name="y3")
    xt = torch.randn(64, 8).t()  # [8, 64], not contiguous
    within_torch_error(decode_linear(xt, w), F.linear(xt, w), decode_linear_ref(xt, w), name="yt")


def test_build_name_is_stable(built):
    """Building does not change the cache key (cpp_extension.load appends to the flag lists it
    is given: a key over a mutated list would rebuild in every new process)."""
    name = cpu_decode._build_name()
    cpu_decode.extension.cache_clear()
    assert cpu_decode.extension() is not None and cpu_decode._build_name() == name


def test_which_calls_it_takes():
    """CPU float32, no autograd, ≤ MAX_ROWS rows, a contiguous weight of ≥ MIN_WEIGHT_ELEMENTS."""
    k = 64
    w = torch.randn(MIN_WEIGHT_ELEMENTS // k, k)
    x = torch.randn(8, k)
    assert suits(x, w) and suits(x, w, torch.zeros(len(w)))
    assert suits(torch.randn(MAX_ROWS, 1, k), w)
    assert not suits(torch.randn(MAX_ROWS + 1, k), w)  # prefill-sized: MKL's blocked GEMM
    assert not suits(x, w[:-1])  # below the size where the weight streams from memory
    assert not suits(x.double(), w.double())
    assert not suits(x.bfloat16(), w.bfloat16())
    assert not suits(x, w.t().contiguous().t())  # non-contiguous weight
    assert not suits(torch.randn(8, k + 1), w)
    assert not suits(torch.randn(8, 1, k), w, torch.zeros(8, len(w)))  # F.linear broadcasts it
    assert not suits(x, w, torch.zeros(len(w) + 1))
    param = nn.Parameter(w.clone())
    assert not suits(x, param)  # autograd on: the kernel has no backward
    with torch.no_grad():
        assert suits(x, param)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not suits(x, param)


def _counting(monkeypatch) -> list:
    calls = []
    real = cpu_decode.decode_linear
    monkeypatch.setattr(cpu_decode, "decode_linear", lambda *a: calls.append(1) or real(*a))
    return calls


def test_linear_swap_is_scoped_and_can_be_turned_off(built, monkeypatch, within_torch_error):
    """Inside the context every suitable `nn.Linear` call runs the kernel, others torch's;
    after it `F.linear` is torch's again; `enabled=False` and RLHF_CPU_DECODE_LINEAR=0 are off."""
    calls = _counting(monkeypatch)
    layer = nn.Linear(64, MIN_WEIGHT_ELEMENTS // 64)
    small = nn.Linear(64, 8)
    x = torch.randn(4, 64)
    original = F.linear
    with torch.no_grad():
        with fast_decode_linear():
            y = layer(x)
            small(x)  # cache-resident weight: torch's linear
            layer(torch.randn(MAX_ROWS + 1, 64))  # too many rows: torch's linear
        assert len(calls) == 1 and F.linear is original
        within_torch_error(
            y, original(x, layer.weight, layer.bias), decode_linear_ref(x, layer.weight, layer.bias)
        )
        with fast_decode_linear(enabled=False):
            layer(x)
        monkeypatch.setenv(cpu_decode.ENV_VAR, "0")
        with fast_decode_linear():
            layer(x)
    assert len(calls) == 1
    with fast_decode_linear(), pytest.raises(ZeroDivisionError):
        raise ZeroDivisionError
    assert F.linear is original


def test_a_failed_build_warns_once_and_keeps_torch_linear(monkeypatch):
    """No compiler / ninja: one RuntimeWarning naming the kernel, then torch's linear."""
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise OSError("no c++ compiler")

    monkeypatch.setattr(cpp_extension, "load", broken)
    cpu_decode.extension.cache_clear()
    try:
        layer = nn.Linear(64, MIN_WEIGHT_ELEMENTS // 64)
        x = torch.randn(2, 64)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with torch.no_grad(), fast_decode_linear():
                y = layer(x)
                layer(x)
        messages = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "decode_linear.cpp" in messages[0]
        assert "no c++ compiler" in messages[0]
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="could not be built or loaded"):
            decode_linear(x, layer.weight)
    finally:
        cpu_decode.extension.cache_clear()


def test_a_second_openmp_runtime_disables_it(monkeypatch, tmp_path):
    """If loading the kernel mapped an OpenMP runtime beside torch's, it is not used."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # its probe folder goes there
    maps = iter([{"/torch/lib/libgomp.so.1"}, {"/torch/lib/libgomp.so.1", "/usr/lib/libomp.so"}])
    monkeypatch.setattr(cpu_decode, "_openmp_runtimes", lambda: next(maps))  # before, after
    monkeypatch.setattr(cpu_decode, "_build_name", lambda: "rlhf_decode_linear_openmp_probe")
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: object())
    cpu_decode.extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="second OpenMP runtime"):
            assert cpu_decode.extension() is None
    finally:
        cpu_decode.extension.cache_clear()


def test_a_stale_build_lock_is_removed(tmp_path):
    """A `lock` older than STALE_LOCK_S (a killed build) is removed with a warning; a fresh one
    (a build running in another process) is left alone."""
    import os
    import time

    lock = tmp_path / "lock"
    lock.write_text("")
    cpu_decode._clear_stale_lock(tmp_path)
    assert lock.exists()
    old = time.time() - cpu_decode.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        cpu_decode._clear_stale_lock(tmp_path)
    assert not lock.exists()


def test_generate_with_the_kernel_keeps_sampler_logprobs_exact(built, monkeypatch):
    """`generate(fast_cpu_decode=True)` runs the decode steps' layers through the kernel (the
    prefill's layers keep torch's GEMM) and its sampler log-probs still equal a teacher-forced float32
    forward to 1e-5 — what the PPO ratio-at-start check relies on; with False, no kernel call.
    Same seed, same tokens: the two differ by float32 summation order only."""
    config = LlamaConfig(
        vocab_size=1100,
        hidden_size=64,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    calls = _counting(monkeypatch)
    ids = torch.randint(3, 1100, (4, 6))
    hf = HFGenerationConfig(do_sample=True, max_new_tokens=5, eos_token_id=2, pad_token_id=0)
    outs = {}
    for fast in (True, False):
        calls.clear()
        torch.manual_seed(1)
        outs[fast] = generate(
            model,
            ids,
            torch.ones_like(ids),
            generation_config=hf,
            eos_token_id=2,
            pad_token_id=0,
            with_logprobs=True,
            min_new_tokens=5,
            fast_cpu_decode=fast,
        )
        # 4 decode steps × (2 layers × 3 MLP projections + LM head), + the prefill's LM head
        # where transformers computes it for the last position only (4 rows); the prefill's
        # layers have 24 rows, the attention projections are below MIN_WEIGHT_ELEMENTS
        assert len(calls) in ((4 * 7, 1 + 4 * 7) if fast else (0,))
    fast, plain = outs[True], outs[False]
    assert torch.equal(fast.response_ids, plain.response_ids)
    full = torch.cat([ids, fast.response_ids], 1)  # [4, 11]
    with torch.no_grad():
        logits = model(input_ids=full).logits[:, ids.shape[1] - 1 : -1]  # [4, 5, V]
    teacher = logits.log_softmax(-1).gather(-1, fast.response_ids[..., None])[..., 0]
    torch.testing.assert_close(fast.logprobs, teacher, rtol=0, atol=1e-5)
