"""`update.loss_aggregation` (`ppo.losses.token_weights`): hand-worked weights, loop references,
micro-batch invariance of every loss term, and the aggregation the update actually applies.

- `token_mean`:          w = m / N_tokens
- `seq_mean_token_mean`: w = m / (|y_i| · N_seqs)     (mean per response, then over responses)
- `token_sum_norm`:      w = m / (N_seqs · max_new_tokens)

The pure-function checks are float64 (only the summation order differs: atol 1e-12); the update
check compares the logged float32 policy loss at ratio 1 with a float64 loop (tolerance from the
ratio's own deviation from 1, see the test).
"""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.models.loading import ModelSpec
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.ppo.config import RewardConfig, UpdateConfig
from rlhf_lightning.ppo.losses import (
    PPOStats,
    entropy_bonus,
    kl_loss,
    policy_loss,
    token_weights,
    value_loss,
)
from tests.conftest import tiny_llama_config
from tests.ppo.test_group_sampling import (
    RecordingOps,
    Step5,
    capture_step5,
    policy_copy,
    run_update,
)

AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "token_sum_norm"]
TOL = 1e-12
F64 = torch.float64
LENGTHS = [3, 1, 2]  # valid tokens per row of the hand-worked mask, width 4
MAX_NEW = 4


@pytest.fixture(scope="module")
def step5(tmp_path_factory, tiny_tokenizer) -> Step5:
    """Step 5's input of a tiny GRPO PPOModule (tests/ppo/test_group_sampling.py)."""
    return capture_step5(tmp_path_factory.mktemp("step5"), tiny_tokenizer, tiny_llama_config)


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()  # [B, R]


def _seq_mean_token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> float:
    """Loop reference: the mean over each row's valid tokens, then the mean over the rows."""
    rows = []
    for values, valid in zip(per_token.tolist(), mask.tolist()):
        kept = [v for v, m in zip(values, valid) if m]
        rows.append(sum(kept) / len(kept))
    return sum(rows) / len(rows)


# ---------------------------------------------------------------- token_weights


def test_token_weights_hand_worked():
    """N_tokens = 6, N_seqs = 3, max_new_tokens = 4; padding weighs 0 in every aggregation."""
    mask = _mask(LENGTHS, 4)
    expected = {
        "token_mean": [[1 / 6] * 3 + [0], [1 / 6, 0, 0, 0], [1 / 6] * 2 + [0] * 2],
        "seq_mean_token_mean": [[1 / 9] * 3 + [0], [1 / 3, 0, 0, 0], [1 / 6] * 2 + [0] * 2],
        "token_sum_norm": [[1 / 12] * 3 + [0], [1 / 12, 0, 0, 0], [1 / 12] * 2 + [0] * 2],
    }
    for aggregation, rows in expected.items():
        got = token_weights(mask, aggregation, 6, 3, MAX_NEW)
        assert got.dtype == F64  # exact in a float64 run; the losses cast to their dtype
        torch.testing.assert_close(got, torch.tensor(rows, dtype=F64), atol=TOL, rtol=0)
    # token_mean and seq_mean_token_mean weigh the minibatch to 1, token_sum_norm by the fill
    sums = [float(token_weights(mask, a, 6, 3, MAX_NEW).sum()) for a in AGGREGATIONS]
    assert sums == pytest.approx([1.0, 1.0, 6 / 12], abs=TOL)


def test_token_weights_use_the_minibatch_counts_not_the_micro_batch():
    """Rows 1–2 of the minibatch as a micro-batch: the counts (6 tokens, 3 responses) stay."""
    mask = _mask(LENGTHS, 4)
    for aggregation in AGGREGATIONS:
        whole = token_weights(mask, aggregation, 6, 3, MAX_NEW)
        part = token_weights(mask[1:], aggregation, 6, 3, MAX_NEW)
        assert torch.equal(part, whole[1:]), aggregation


def test_unknown_aggregation_is_a_config_error():
    with pytest.raises(ValueError, match=r"model\.update\.loss_aggregation: unknown 'sum'"):
        token_weights(_mask(LENGTHS, 4), "sum", 6, 3, MAX_NEW)
    with pytest.raises(ValueError, match=r"model\.update\.loss_aggregation: 'sum' is not one of"):
        PPOModule(
            model_spec=ModelSpec(config={"model_type": "llama"}),
            reward=RewardConfig(function="rlhf_lightning.ppo.toy:word_frequency"),
            update=UpdateConfig(loss_aggregation="sum"),
        )


# ---------------------------------------------------------------- the losses with weights


def _batch(seed: int = 0):
    """Float64 [6, 5] inputs of every loss term and a mask of uneven lengths."""
    gen = torch.Generator().manual_seed(seed)
    draw = [torch.randn(6, 5, generator=gen, dtype=F64) for _ in range(6)]
    logp, old, adv, values, returns, entropy = draw
    mask = _mask([5, 1, 3, 4, 2, 5], 5)
    return {
        "logp": logp * 0.1,
        "old": old * 0.1,
        "adv": adv,
        "values": values,
        "returns": returns,
        "entropy": entropy.abs(),
        "kl": (entropy * 0.3).abs(),
        "mask": mask,
    }


def _losses(b: dict, idx: torch.Tensor, aggregation: str, counts: tuple[float, float], grads):
    """Every loss term of rows `idx` with the minibatch's `counts` (tokens, responses); their
    weighted sum is backpropagated into `grads` (log-probs and values with grad)."""
    logp, values = grads
    mask = b["mask"][idx]
    n_tokens, n_seqs = counts
    weights = token_weights(mask, aggregation, n_tokens, n_seqs, 5)
    pg, _ = policy_loss(logp[idx], b["old"][idx], b["adv"][idx], mask, n_tokens, weights=weights)
    vl, _ = value_loss(
        values[idx], b["old"][idx], b["returns"][idx], mask, n_tokens, weights=weights
    )
    ent = entropy_bonus(b["entropy"][idx] * logp[idx].exp(), mask, n_tokens, weights=weights)
    kl = kl_loss(b["kl"][idx] * logp[idx].exp(), mask, n_tokens, weights=weights)
    total = pg + 0.1 * vl - 0.01 * ent + 0.05 * kl
    total.backward()
    return {"policy": pg, "value": vl, "entropy": ent, "kl": kl, "total": total}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_every_loss_term_is_micro_batch_invariant(aggregation):
    """Summed micro-batch losses and their gradients equal the whole minibatch's, for splits of
    [6], [2, 2, 2], [1] × 6 and [4, 2] rows."""
    b = _batch()
    counts = (float(b["mask"].sum()), 6.0)

    def run(split):
        grads = (b["logp"].clone().requires_grad_(True), b["values"].clone().requires_grad_(True))
        stats = PPOStats()
        for idx in split:
            stats.add(
                {k: v.detach() for k, v in _losses(b, idx, aggregation, counts, grads).items()}
            )
        return stats.end_minibatch(), grads[0].grad, grads[1].grad

    rows = torch.arange(6)
    whole = run([rows])
    for split in ([rows[:2], rows[2:4], rows[4:]], [rows[i : i + 1] for i in range(6)],
                  [rows[:4], rows[4:]]):  # fmt: skip
        other = run(split)
        assert other[0] == pytest.approx(whole[0], abs=TOL)
        torch.testing.assert_close(other[1], whole[1], atol=TOL, rtol=0)
        torch.testing.assert_close(other[2], whole[2], atol=TOL, rtol=0)


def test_seq_mean_token_mean_equals_the_loop_reference():
    b = _batch(1)
    mask, kl = b["mask"], b["kl"]
    weights = token_weights(mask, "seq_mean_token_mean", float(mask.sum()), 6.0, 5)
    got = kl_loss(kl, mask, float(mask.sum()), weights=weights)
    assert float(got) == pytest.approx(_seq_mean_token_mean(kl, mask), abs=TOL)
    # at ratio 1 the clipped surrogate is −A per token: the loss is −(mean of per-row means of A)
    pg, _ = policy_loss(b["old"], b["old"], b["adv"], mask, float(mask.sum()), weights=weights)
    assert float(pg) == pytest.approx(-_seq_mean_token_mean(b["adv"], mask), abs=TOL)
    # differs from the token mean when the lengths differ
    token_mean = float((kl * mask).sum() / mask.sum())
    assert abs(token_mean - float(got)) > 1e-3


def test_token_sum_norm_is_the_sum_over_responses_times_max_new_tokens():
    b = _batch(2)
    mask, kl = b["mask"], b["kl"]
    max_new = 8  # the normaliser is the configured budget, not the batch's width of 5
    weights = token_weights(mask, "token_sum_norm", float(mask.sum()), 6.0, max_new)
    got = kl_loss(kl, mask, float(mask.sum()), weights=weights)
    expected = sum(v for row, m in zip(kl.tolist(), mask.tolist()) for v, k in zip(row, m) if k)
    assert float(got) == pytest.approx(expected / (6 * max_new), abs=TOL)


# ---------------------------------------------------------------- through ppo_update


def _aggregate(adv: torch.Tensor, mask: torch.Tensor, aggregation: str, max_new: int):
    """Float64 loop reference of Σ A · w for Float[B, R] values `adv` over a minibatch."""
    valid = [[a for a, m in zip(row, keep) if m] for row, keep in zip(adv.tolist(), mask.tolist())]
    total = sum(sum(row) for row in valid)
    if aggregation == "token_mean":
        return total / sum(len(row) for row in valid)
    if aggregation == "seq_mean_token_mean":
        return sum(sum(row) / len(row) for row in valid) / len(valid)
    return total / (len(valid) * max_new)


def test_update_applies_the_configured_aggregation(step5):
    """One minibatch, one epoch: before any step the ratio is 1, so the logged policy loss is
    −Σ A · w — the configured aggregation of the advantages (a float64 loop reference).

    The captured rows with responses cut to uneven lengths and fixed sequence advantages
    (`Step5.uneven`). Tolerance: the update's forward reproduces π_old to |ratio − 1| ≤ 1e-5
    per token (measured ≤ 5e-7, tests/ppo/test_update.py), which moves the loss by at most
    1e-5 · Σ|A · w|; the three aggregations differ by ≥ 10× that."""
    exp, max_new = step5.uneven, step5.kwargs["gen"].max_new_tokens
    mask = exp.response_mask
    adv = exp.advantages  # [B, R]
    assert len(set(mask.sum(1).tolist())) > 1  # uneven lengths: the aggregations differ
    exact = {a: -_aggregate(adv.double(), mask, a, max_new) for a in AGGREGATIONS}
    atol = {a: 1e-5 * _aggregate(adv.double().abs(), mask, a, max_new) for a in AGGREGATIONS}
    values = sorted(exact.values())
    assert min(b - a for a, b in zip(values, values[1:])) > 10 * max(atol.values()), exact
    for aggregation in AGGREGATIONS:
        models = policy_copy(step5)
        stats = run_update(
            step5,
            models,
            RecordingOps(models.policy),
            exp=exp,
            num_minibatches=1,
            loss_aggregation=aggregation,
        )
        assert stats.epochs_done == 1
        got = stats.loss_policy
        assert abs(got - exact[aggregation]) <= atol[aggregation], (aggregation, got, exact)
