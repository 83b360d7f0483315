"""Shared test set-up: offline hub, Triton interpreter on CPU, tiny tokenizers and models, and
the rule for judging a low-precision result against float64 (`within_torch_error`).

`TRITON_INTERPRET` must be set before `import triton`, so it is set here, before any
test module is imported.

Float32 results differ between CPUs (torch dispatches to AVX-512, AVX2 or scalar kernels) and
thread counts, because reductions are summed in another order. A fixed tolerance such as 1e-5 is
therefore either loose or CPU-dependent: at V=262144 torch's own float32 entropy is off by 7.5e-5
with AVX-512 kernels and 1.85e-4 with AVX2 ones. Tests judge a float32 result against a float64
reference instead, allowing twice the error that torch's own plain float32 computation makes on
the same input on the same machine: see `assert_within_torch_error`. Emulate another CPU with
`ATEN_CPU_CAPABILITY=avx2` (or `default`) and another thread count with `RLHF_TEST_THREADS=N`
(default 1; every test starts with it).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
HH_TEST = SHARED_DATA / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
ALPACA = SHARED_DATA / "alpaca" / "alpaca_5000.json"

TINY_CORPUS = [
    "the movie was great and the acting was wonderful .",
    "the plot was boring , the ending was terrible !",
    "write a short review of the film ? it is fine , i guess .",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "0 1 2 3 4 5 6 7 8 9 hello world yes no good bad",
]


# Tiny models are per-op-overhead bound: one intra-op thread is faster than two on 2 cores (tiny
# matmuls ~30× slower with two on a shared machine). Every test starts with this count, whatever an
# earlier one set (the quickstart runner sets its own), so its float32 numbers are reproducible.
TEST_THREADS = int(os.environ.get("RLHF_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)

#: Default slack of the rule in float32 ulps of the largest |reference| value (see below).
FLOAT32_ULPS = 8.0


def assert_within_torch_error(
    ours,
    torch_own,
    exact,
    *,
    name: str = "value",
    factor: float = 2.0,
    ulps: float = FLOAT32_ULPS,
    ulp_dtype: torch.dtype = torch.float32,
    atol: float = 0.0,
) -> None:
    """Assert ``max|ours - exact| <= factor·max|torch_own - exact| + ulps·eps·max|exact| + atol``.

    ``exact`` is the float64 reference, ``torch_own`` the plain torch computation in the low
    precision dtype on the same input (e.g. ``log_softmax`` in float32), ``ours`` the result under
    test. Max-norms over the whole tensor, not elementwise: torch's rounding error at a single
    element can be 0 by luck, which would leave only the ulp term, whereas its maximum is the
    float32 noise level of this input on this CPU. The ulp term (``ulps`` units of ``ulp_dtype``
    at the largest ``|exact|``) covers inputs where torch happens to be exact; ``atol`` is an
    absolute floor. ``factor`` is 2 unless a test says why not. Non-finite entries of ``exact``
    must be reproduced exactly.
    """
    ours, torch_own, exact = (
        torch.as_tensor(x).detach().double() for x in (ours, torch_own, exact)
    )
    assert ours.shape == exact.shape == torch_own.shape, (
        f"{name}: shapes {tuple(ours.shape)} / {tuple(torch_own.shape)} / {tuple(exact.shape)}"
    )
    finite = torch.isfinite(exact)  # [...]
    assert torch.equal(ours[~finite], exact[~finite]), f"{name}: non-finite entries differ"
    if not finite.any():
        return
    err = torch.where(finite, (ours - exact).abs(), 0.0)  # [...]
    err_torch = torch.where(finite, (torch_own - exact).abs(), 0.0).max().item()
    scale = torch.where(finite, exact.abs(), 0.0).max().item()
    slack = ulps * torch.finfo(ulp_dtype).eps * scale + atol
    if err.max().item() <= factor * err_torch + slack:
        return
    worst = int(err.argmax())
    at = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
    raise AssertionError(
        f"{name}: max |ours - float64| = {err.max().item():.3e} at {at} (ours "
        f"{ours.flatten()[worst].item():.9g}, torch {torch_own.flatten()[worst].item():.9g}, "
        f"float64 {exact.flatten()[worst].item():.9g}) > {factor:g} × torch's own max error "
        f"{err_torch:.3e} + {slack:.3e} ({ulps:g} {ulp_dtype} ulps of {scale:.3g} + {atol:g})"
    )


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(TEST_THREADS)
    yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Word-level tokenizer without a chat template (the plain-template path)."""
    from rlhf_lightning.tasks.tokenizer import build_word_tokenizer

    return build_word_tokenizer(TINY_CORPUS)


@pytest.fixture(scope="session")
def tiny_chat_tokenizer():
    """Word-level tokenizer with a chat template."""
    from rlhf_lightning.tasks.tokenizer import build_word_tokenizer

    return build_word_tokenizer(TINY_CORPUS, chat_template=True)


def tiny_llama_config(vocab_size: int) -> dict:
    """Config dict for a ~50k-parameter Llama, for `ModelSpec(config=...)`."""
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }


@pytest.fixture
def within_torch_error():
    """The float32 error rule as a fixture: `within_torch_error(ours, torch_own, exact, ...)`."""
    return assert_within_torch_error


@pytest.fixture
def tiny_config():
    """Factory fixture: `tiny_config(vocab_size)` → Llama config dict."""
    return tiny_llama_config


@pytest.fixture(scope="session")
def hh_path():
    """Anthropic HH helpful-base test split; skips when ../shared/data is absent."""
    if not HH_TEST.exists():
        pytest.skip(f"real data absent: {HH_TEST}")
    return HH_TEST


@pytest.fixture(scope="session")
def alpaca_path():
    """Alpaca 5000 subset; skips when ../shared/data is absent."""
    if not ALPACA.exists():
        pytest.skip(f"real data absent: {ALPACA}")
    return ALPACA
