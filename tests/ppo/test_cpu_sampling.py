"""The rollout's CPU sampler (`generation.sample_categorical`, `cpu_sampling`): one uniform per row
against the CDF draws from the same categorical distribution as `torch.multinomial`."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_lightning.ppo import generation
from rlhf_lightning.ppo.generation import cpu_sampling, generate, sample_categorical


def test_draws_follow_the_probabilities_and_never_a_zero():
    """40 000 draws of [0.5, 0, 0.2, 0.3, 0] (and the same row unnormalised, × 2): frequencies
    within 5 binomial standard deviations, zero-probability entries never drawn."""
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    n = 40_000
    for scale in (1.0, 2.0):
        rows = (scale * probs).expand(n, -1)
        draws = sample_categorical(rows, torch.Generator().manual_seed(0))  # [n, 1]
        assert draws.shape == (n, 1) and draws.dtype == torch.long
        freq = torch.bincount(draws[:, 0], minlength=5).double() / n
        sd = (probs.double() * (1 - probs.double()) / n).sqrt()
        assert torch.all((freq - probs.double()).abs() <= 5 * sd + 1e-12), freq
        assert freq[1] == 0 and freq[4] == 0


def test_one_hot_rows_and_the_last_entry():
    """A row with all mass on one entry (first, middle or last) always draws it."""
    rows = torch.eye(4)[[0, 2, 3]]  # [3, 4]
    for seed in range(5):
        assert sample_categorical(rows, torch.Generator().manual_seed(seed))[:, 0].tolist() == [
            0,
            2,
            3,
        ]


def test_context_swaps_only_single_draws_of_cpu_matrices():
    original = torch.multinomial
    probs = torch.tensor([[0.1, 0.9], [0.7, 0.3]])
    with cpu_sampling():
        assert torch.multinomial is not original
        assert torch.multinomial(probs, 1).shape == (2, 1)
        three = torch.multinomial(probs, 3, replacement=True)  # torch's own sampler
        assert three.shape == (2, 3)
        assert torch.multinomial(probs[0], 1).shape == (1,)  # 1-D: torch's own
    assert torch.multinomial is original


def test_generate_uses_it_only_when_asked(monkeypatch):
    """`generate(fast_cpu_sampling=True)` draws every token with `sample_categorical`; False
    leaves torch's sampler. Both sample EOS-free responses of the asked length."""
    config = LlamaConfig(
        vocab_size=23,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    calls = []
    real = generation.sample_categorical
    monkeypatch.setattr(generation, "sample_categorical", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(3, 23, (2, 4))
    hf = HFGenerationConfig(do_sample=True, max_new_tokens=5, eos_token_id=2, pad_token_id=0)
    for fast in (True, False):
        calls.clear()
        out = generate(
            model,
            ids,
            torch.ones_like(ids),
            generation_config=hf,
            eos_token_id=2,
            pad_token_id=0,
            with_logprobs=True,
            min_new_tokens=5,
            fast_cpu_sampling=fast,
        )
        assert out.response_ids.shape == (2, 5) and bool((out.response_ids != 2).all())
        assert torch.isfinite(out.logprobs).all()
        assert len(calls) == (5 if fast else 0)


@pytest.mark.parametrize(
    "row", [[float("nan"), 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, float("inf"), 0.0, 0.0]]
)
def test_invalid_probabilities_still_raise(row):
    """NaN, inf or all-zero rows (a diverged policy) fail as torch's sampler does, not silently."""
    with cpu_sampling(), pytest.raises(RuntimeError):
        torch.multinomial(torch.tensor([row, [0.5, 0.5, 0.0, 0.0]]), 1)
