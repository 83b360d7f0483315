"""GAE, whitening and KL-penalised rewards against plain-Python references."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.ppo.advantages import (
    explained_variance,
    gae,
    kl_penalised_rewards,
    masked_mean,
    whiten,
)


def _gae_loop(rewards, values, length, gamma, lam):
    """Textbook per-episode GAE on python floats, episode of `length` steps, V(terminal)=0."""
    adv = [0.0] * length
    running = 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_loop_reference(gamma, lam):
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 1, 7, 3]
    rewards = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    values = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    mask = torch.zeros(4, 7, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        ref = _gae_loop(rewards[b, :n].tolist(), values[b, :n].tolist(), n, gamma, lam)
        assert adv[b, :n].tolist() == pytest.approx(ref, abs=1e-12)
        assert torch.all(adv[b, n:] == 0) and torch.all(ret[b, n:] == 0)
        assert ret[b, :n].tolist() == pytest.approx((adv[b, :n] + values[b, :n]).tolist())


def test_gae_hand_worked():
    # two steps, γ=0.5, λ=0.5: δ1 = 2 − 1 = 1; δ0 = 0 + 0.5·1 − 0 = 0.5; A0 = 0.5 + 0.25·1 = 0.75
    adv, ret = gae(
        torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 1.0]]), torch.ones(1, 2), 0.5, 0.5
    )
    assert adv.tolist() == [[0.75, 1.0]]
    assert ret.tolist() == [[0.75, 2.0]]


def test_padding_values_do_not_leak():
    mask = torch.tensor([[1, 1, 0, 0]])
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    a1, _ = gae(rewards, torch.tensor([[0.3, 0.2, 0.0, 0.0]]), mask, 1.0, 0.9)
    a2, _ = gae(rewards, torch.tensor([[0.3, 0.2, 99.0, -5.0]]), mask, 1.0, 0.9)
    assert torch.equal(a1, a2)


def test_whiten_over_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = whiten(x, mask)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    ref = (valid - valid.mean()) / valid.std()  # unbiased std, like the implementation
    assert out[mask.bool()].tolist() == pytest.approx(ref.tolist(), abs=1e-6)
    assert out[~mask.bool()].tolist() == [0.0, 0.0, 0.0]
    assert float(masked_mean(out, mask)) == pytest.approx(0.0, abs=1e-6)
    kept = whiten(x, mask, shift_mean=False)  # unit variance, original mean kept
    assert float(masked_mean(kept, mask)) == pytest.approx(float(valid.mean()), abs=1e-5)
    assert kept[mask.bool()].tolist() == pytest.approx((ref + valid.mean()).tolist(), abs=1e-5)


def test_kl_penalised_rewards_score_at_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    rewards = kl_penalised_rewards(torch.tensor([1.0, -2.0, 5.0]), kl, mask, kl_coef=0.5)
    expected = [[-0.05, -0.1, -0.15 + 1.0, 0.0], [-0.25 - 2.0, 0, 0, 0], [0, 0, 0, 0]]
    assert rewards.tolist() == [pytest.approx(row) for row in expected]


def test_explained_variance():
    mask = torch.ones(1, 4)
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(returns) + 2.5, returns, mask) == pytest.approx(0.0)
