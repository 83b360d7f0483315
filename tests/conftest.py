"""Shared test set-up: offline hub, Triton interpreter on CPU, tiny tokenizers and models.

`TRITON_INTERPRET` must be set before `import triton`, so it is set here, before any
test module is imported.
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


# Tiny models are per-op-overhead bound: one intra-op thread is faster than two on 2 cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
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
