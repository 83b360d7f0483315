"""PPO loss terms on hand-worked values, and invariance to the micro-batch split."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.ppo.losses import (
    PPOStats,
    entropy_bonus,
    kl_loss,
    policy_loss,
    ptx_loss,
    value_loss,
)


def test_policy_loss_hand_worked():
    # ratios e^{log r}: 1.5 (A=+1 → clipped to 1.2), 0.5 (A=−1 → clipped to 0.8 → loss 0.8),
    # 1.0 (A=2 → −2), masked token ignored. Sum = −1.2 + 0.8 − 2 = −2.4, over n=4 → −0.6
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0, 7.0]]))
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(new, old, adv, mask, n_tokens=4, clip_eps=0.2)
    assert float(loss) == pytest.approx(-0.6)
    assert float(stats["clipfrac"]) == pytest.approx(2 / 4)
    assert float(stats["ratio_mean"]) == pytest.approx(3.0 / 4)
    k3 = (0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))
    assert float(stats["approxkl"]) == pytest.approx(k3 / 4)


def test_policy_loss_dual_clip_caps_negative_advantages():
    new = torch.log(torch.tensor([[5.0, 5.0]]))
    old = torch.zeros(1, 2)
    adv = torch.tensor([[-1.0, 1.0]])
    plain, _ = policy_loss(new, old, adv, torch.ones(1, 2), 2, clip_eps=0.2)
    dual, stats = policy_loss(new, old, adv, torch.ones(1, 2), 2, clip_eps=0.2, dual_clip=3.0)
    # token 0: max(5, 1.2) = 5 → capped at 3; token 1: max(−5, −1.2) = −1.2
    assert float(plain) == pytest.approx((5.0 - 1.2) / 2)
    assert float(dual) == pytest.approx((3.0 - 1.2) / 2)
    assert float(stats["dual_clipfrac"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(new, old, adv, torch.ones(1, 2), 2, dual_clip=0.5)


def test_policy_loss_gradient_is_minus_advantage_at_ratio_one():
    logp = torch.zeros(1, 3, requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    loss, _ = policy_loss(logp, torch.zeros(1, 3), adv, torch.tensor([[1, 1, 0]]), 2)
    loss.backward()
    assert logp.grad.tolist() == [[-0.5, 1.0, 0.0]]


def test_value_loss_hand_worked():
    values = torch.tensor([[1.0, 0.0, 3.0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, n_tokens=2, clip_range=0.5)
    # token 0: unclipped (1−2)² = 1, clipped (0.5−2)² = 2.25 → 2.25; token 1: (0−1)² both → 1
    assert float(loss) == pytest.approx(0.5 * (2.25 + 1.0) / 2)
    assert float(stats["clipfrac"]) == pytest.approx(0.5)
    assert float(stats["mean"]) == pytest.approx(0.5)
    plain, _ = value_loss(values, old, returns, mask, n_tokens=2, clip_range=None)
    assert float(plain) == pytest.approx(0.5 * (1.0 + 1.0) / 2)


def test_entropy_kl_ptx_hand_worked():
    mask = torch.tensor([[1, 1, 0]])
    assert float(entropy_bonus(torch.tensor([[2.0, 4.0, 9.0]]), mask, 3)) == pytest.approx(2.0)
    assert float(kl_loss(torch.tensor([[0.5, 0.1, 9.0]]), mask, 2)) == pytest.approx(0.3)
    assert float(ptx_loss(torch.tensor([[-1.0, -3.0, -9.0]]), mask, 2)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="n_tokens"):
        ptx_loss(torch.zeros(1, 3), mask, 0)


def test_micro_batch_invariance():
    """Summed micro-batch losses (and their gradients) equal the full-minibatch loss."""
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(6, 5, generator=gen, dtype=torch.float64) * 0.1
    old = torch.randn(6, 5, generator=gen, dtype=torch.float64) * 0.1
    adv = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    values = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    returns = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    mask = torch.zeros(6, 5, dtype=torch.long)
    for b, n in enumerate([5, 1, 3, 4, 2, 5]):
        mask[b, :n] = 1
    n_tokens = int(mask.sum())

    def run(split):
        p = logp.clone().requires_grad_(True)
        v = values.clone().requires_grad_(True)
        stats, total = PPOStats(), 0.0
        for idx in split:
            pl, ps = policy_loss(p[idx], old[idx], adv[idx], mask[idx], n_tokens, dual_clip=2.0)
            vl, vs = value_loss(v[idx], old[idx], returns[idx], mask[idx], n_tokens)
            loss = pl + 0.1 * vl
            loss.backward()
            total += float(loss.detach())
            stats.add(ps, "policy/")
            stats.add(vs, "val/")
        return total, p.grad, v.grad, stats.end_minibatch()

    full = run([torch.arange(6)])
    micro = run([torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])])
    single = run([torch.tensor([i]) for i in range(6)])
    for other in (micro, single):
        assert other[0] == pytest.approx(full[0], abs=1e-12)
        assert torch.allclose(other[1], full[1], atol=1e-12)
        assert torch.allclose(other[2], full[2], atol=1e-12)
        assert other[3] == pytest.approx(full[3], abs=1e-12)


def test_ppo_stats_averages_minibatches():
    stats = PPOStats()
    stats.add({"a": 1.0})
    stats.add({"a": 2.0})
    assert stats.end_minibatch() == {"a": 3.0}
    stats.add({"a": 5.0})
    stats.end_minibatch()
    assert stats.means() == {"a": 4.0}
    assert stats.first == {"a": 3.0}
