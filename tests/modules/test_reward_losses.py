"""Reward losses and metrics on hand-worked examples (no models)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.modules.reward_losses import (
    bradley_terry_loss,
    kwise_ranking_loss,
    ranked_pairs,
    reward_centering_loss,
    reward_model_loss,
)
from rlhf_lightning.modules.reward_metrics import PairwiseAccuracy, RewardMoments

# -log σ(x) = log(1 + e^-x), worked out by hand:
NLS_0 = 0.6931471805599453  # log 2
NLS_1 = 0.31326168751822286  # log(1 + e^-1)
NLS_2 = 0.12692801104297263  # log(1 + e^-2)
NLS_M1 = 1.3132616875182228  # log(1 + e^1)


def test_bradley_terry_without_margin():
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((NLS_1 + NLS_0) / 2, abs=1e-6)


def test_bradley_terry_with_margin():
    # diff 2, margin 1 → -log σ(1); diff 0, margin -1 → -log σ(1)
    loss = bradley_terry_loss(
        torch.tensor([2.0, 0.5]), torch.tensor([0.0, 0.5]), torch.tensor([1.0, -1.0])
    )
    assert loss.item() == pytest.approx(NLS_1, abs=1e-6)


def test_ranked_pairs_all_c_k_2_pairs_per_group():
    group = torch.tensor([0, 0, 0, 1, 1])
    rank = torch.tensor([0, 1, 2, 0, 1])
    pairs = ranked_pairs(group, rank)
    got = sorted(zip(pairs.better.tolist(), pairs.worse.tolist()))
    assert got == [(0, 1), (0, 2), (1, 2), (3, 4)]
    weights = dict(zip(zip(pairs.better.tolist(), pairs.worse.tolist()), pairs.weight.tolist()))
    assert weights[(0, 1)] == pytest.approx(1 / 3) and weights[(3, 4)] == pytest.approx(1.0)


def test_ranked_pairs_rejects_group_without_pair():
    with pytest.raises(ValueError, match="group 1"):
        ranked_pairs(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]))


def test_kwise_loss_averages_pairs_within_prompt_then_prompts():
    # prompt 0: K=3 rewards 2 > 1 > 0 → diffs 1, 2, 1; prompt 1: K=2, the better one scores lower.
    rewards = torch.tensor([2.0, 1.0, 0.0, 0.0, 1.0])
    group = torch.tensor([0, 0, 0, 1, 1])
    rank = torch.tensor([0, 1, 2, 0, 1])
    loss = kwise_ranking_loss(rewards, ranked_pairs(group, rank))
    prompt0 = (NLS_1 + NLS_2 + NLS_1) / 3
    assert loss.item() == pytest.approx((prompt0 + NLS_M1) / 2, abs=1e-6)


def test_kwise_margin_applies_to_every_pair_of_its_prompt():
    rewards = torch.tensor([3.0, 2.0, 1.0])
    pairs = ranked_pairs(torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]))
    loss = kwise_ranking_loss(rewards, pairs, margin=torch.tensor([1.0]))
    # diffs 1, 2, 1 minus margin 1 → 0, 1, 0
    assert loss.item() == pytest.approx((NLS_0 + NLS_1 + NLS_0) / 3, abs=1e-6)


def test_kwise_with_k2_equals_bradley_terry():
    gen = torch.Generator().manual_seed(3)
    chosen, rejected = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    margin = torch.rand(6, generator=gen)
    rewards = torch.stack([chosen, rejected], dim=1).reshape(-1)  # rows 2g, 2g+1
    group = torch.arange(6).repeat_interleave(2)
    rank = torch.tensor([0, 1]).repeat(6)
    kwise = kwise_ranking_loss(rewards, ranked_pairs(group, rank), margin)
    bt = bradley_terry_loss(chosen, rejected, margin)
    assert kwise.item() == pytest.approx(bt.item(), abs=1e-6)


def test_kwise_each_prompt_weighs_the_same():
    # A K=4 prompt and a K=2 prompt with the same per-pair loss contribute equally.
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0], requires_grad=True)
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    rank = torch.tensor([0, 1, 2, 3, 0, 1])
    loss = kwise_ranking_loss(rewards, ranked_pairs(group, rank))
    assert loss.item() == pytest.approx(NLS_0, abs=1e-6)
    loss.backward()
    grad = rewards.grad
    # prompt 1's best row gets -0.5 * 1/1 / 2; prompt 0's best row 3 pairs * -0.5 * 1/6 / 2
    assert grad[4].item() == pytest.approx(-0.25, abs=1e-6)
    assert grad[0].item() == pytest.approx(-0.125, abs=1e-6)
    assert grad.sum().item() == pytest.approx(0.0, abs=1e-6)


def test_reward_centering_hand_worked():
    rewards = torch.tensor([1.0, 3.0, -2.0, 0.0])
    group = torch.tensor([0, 0, 1, 1])
    # prompt means 2 and -1 → (4 + 1) / 2
    assert reward_centering_loss(rewards, group, 2).item() == pytest.approx(2.5)
    loss, parts = reward_model_loss(rewards, group, torch.tensor([0, 1, 0, 1]), 2, center_coef=0.1)
    ranking = 2.1269280110429727  # both pairs have diff -2: log(1 + e^2)
    assert parts["ranking"].item() == pytest.approx(ranking, abs=1e-6)
    assert loss.item() == pytest.approx(ranking + 0.25, abs=1e-6)
    assert parts["diff"].tolist() == [-2.0, -2.0]


def test_pairwise_accuracy_counts_ties_as_wrong_and_accumulates():
    metric = PairwiseAccuracy()
    metric.update(torch.tensor([1.0, -1.0, 0.0, 2.0]))
    assert metric.compute().item() == pytest.approx(0.5)
    metric.update(torch.tensor([3.0, 4.0]))
    assert metric.compute().item() == pytest.approx(4 / 6)
    metric.reset()
    metric.update(torch.tensor([-1.0]))
    assert metric.compute().item() == 0.0


def test_reward_moments_mean_and_std():
    metric = RewardMoments()
    metric.update(torch.tensor([1.0, 2.0]))
    metric.update(torch.tensor([3.0, 4.0]))
    out = metric.compute()
    assert out["mean"].item() == pytest.approx(2.5)
    assert out["std"].item() == pytest.approx(math.sqrt(1.25), abs=1e-6)
    assert out["count"].item() == 4
