"""Group integrity (`generation.samples_per_prompt: k`): the k samples of a prompt stay together
from the rollout through minibatch shuffling; micro-batching does not change the update.

`step5` captures what a tiny critic-free PPOModule (GRPO, k = 2) hands to `ppo_update` in its
first iteration, plus a snapshot of the models taken just before, as tests/ppo/test_update.py
does for PPO; the update tests then rerun `ppo_update` on copies with `LocalOps`.

Float tolerance of the micro-batch test (tests/conftest.py `within_torch_error`): the result with
micro-batches (float32) against the same update in float64 may err by 2 × the error of the float32
update without micro-batches + 8 float32 ulps. A micro-batching bug (a per-micro-batch count, a
dropped or doubled row) moves the gradient by ≳ 1e-2 relative; summation order by ~1e-7.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, fields, replace

import lightning.pytorch as pl
import pytest
import torch

import rlhf_lightning.ppo.generation as generation
import rlhf_lightning.ppo.update as step
from rlhf_lightning.modules.common import OptimConfig
from rlhf_lightning.ppo import minibatches
from rlhf_lightning.ppo.config import GenerationConfig, RewardConfig, UpdateConfig
from rlhf_lightning.ppo.experience import Experience
from rlhf_lightning.ppo.models import PPOModels
from rlhf_lightning.ppo.rollout import PromptBatch, Rollout
from tests.conftest import tiny_llama_config
from tests.ppo.test_ppo_module import TOY, _datamodule, _module, _trainer

K = 2  # samples per prompt in `step5`
PROMPTS = 4  # prompts per iteration in `step5` (8 rows)
PERMUTATION_SEED = 123  # torch.manual_seed before every ppo_update: the same minibatches
UNEVEN = [8, 3, 5, 1, 7, 2, 6, 4]  # response lengths the update tests cut the 8 rows to
ROW_ADVANTAGES = [1.0, -0.5, 0.25, -1.5, 0.75, 1.25, -1.0, 0.5]  # and their sequence advantages


@dataclass
class Step5:
    """Steps 1–5 of a critic-free PPOModule's first iteration."""

    models: PPOModels  # policy deep-copied right before step 5 (no critic)
    rollout: Rollout  # B = PROMPTS · K rows
    prompts: PromptBatch  # the datamodule batch: PROMPTS prompts
    exp: Experience
    kwargs: dict  # upd, kl, gen, kl_coef as the module passed them

    @property
    def uneven(self) -> Experience:
        """`exp` with responses of the lengths `UNEVEN` and sequence advantages `ROW_ADVANTAGES`
        (what the aggregations tell apart): the untrained policy rarely samples EOS, so the
        captured responses are all max_new_tokens long, and most of its groups tie (A ≈ 0)."""
        exp = with_lengths(self.exp, UNEVEN)
        advantages = torch.tensor(ROW_ADVANTAGES)[:, None] * exp.response_mask  # [B, R]
        return replace(exp, advantages=advantages)


def with_lengths(exp: Experience, lengths: list[int]) -> Experience:
    """Each row's response cut to `lengths` tokens. The forward is causal, so π_old of the kept
    tokens is unchanged; the cut tokens become padding (mask 0, float tensors 0)."""
    width = exp.response_mask.shape[1]
    keep = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # [B, R]
    keep = keep & exp.response_mask.bool()
    cut = {
        name: getattr(exp, name) * keep
        for name in ("old_logprobs", "ref_logprobs", "advantages", "returns")
    }
    return replace(exp, response_mask=exp.response_mask * keep, **cut)


def capture_step5(root, tokenizer, config, **module_kw) -> Step5:
    """Fit a tiny GRPO PPOModule (k = 2) for one iteration and keep step 5's input."""
    captured: dict = {}
    real_update, real_rollout = step.ppo_update, generation.rollout

    def sampling(models, prompts, *args, **kw):
        captured["prompts"] = prompts
        captured["rollout"] = real_rollout(models, prompts, *args, **kw)
        return captured["rollout"]

    def updating(models, exp, upd, kl, gen, **kw):
        policy = copy.deepcopy(models.policy)
        captured.update(models=replace(models, policy=policy), exp=exp)
        captured["kwargs"] = {"upd": upd, "kl": kl, "gen": gen, "kl_coef": kw["kl_coef"]}
        return real_update(models, exp, upd, kl, gen, **kw)

    args = {  # reward: the share of "the" (the untrained policy rarely says "good")
        "reward": RewardConfig(function=TOY, function_kwargs={"word": "the"}, normalize="none"),
        "generation": GenerationConfig(max_new_tokens=8, samples_per_prompt=K),
        "update": UpdateConfig(advantage="grpo", ppo_epochs=1, max_grad_norm=None),
        "optim": OptimConfig(lr=3e-3, min_lr_ratio=1.0),
    }
    args.update(module_kw)
    pl.seed_everything(0)
    module = _module(tokenizer, config, **args)
    dm = _datamodule(tokenizer, n_prompts=PROMPTS, batch_size=PROMPTS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step, "ppo_update", updating)
        patch.setattr(generation, "rollout", sampling)
        _trainer(root, limit_train_batches=1).fit(module, datamodule=dm)
    return Step5(**captured)


@pytest.fixture(scope="module")
def step5(tmp_path_factory, tiny_tokenizer) -> Step5:
    return capture_step5(tmp_path_factory.mktemp("step5"), tiny_tokenizer, tiny_llama_config)


def run_update(run: Step5, models: PPOModels, ops, exp=None, **upd_changes) -> step.UpdateStats:
    """`ppo_update` on the captured Experience (or `exp`) with the module's settings changed."""
    kw = dict(run.kwargs)
    upd = replace(kw.pop("upd"), **upd_changes)
    torch.manual_seed(PERMUTATION_SEED)
    exp = run.exp if exp is None else exp
    return step.ppo_update(models, exp, upd, kw.pop("kl"), kw.pop("gen"), ops=ops, **kw)


class RecordingOps(step.LocalOps):
    """`LocalOps` with plain SGD on the policy; keeps the gradients of the first step."""

    def __init__(self, policy: torch.nn.Module, lr: float = 0.05):
        self.named = {n: p for n, p in policy.named_parameters() if p.requires_grad}
        super().__init__([torch.optim.SGD(list(self.named.values()), lr=lr)])
        self.first_grads: dict[str, torch.Tensor] | None = None

    def step(self) -> None:
        if self.first_grads is None:
            self.first_grads = {n: p.grad.detach().clone() for n, p in self.named.items()}
        super().step()


def policy_copy(run: Step5, dtype=torch.float32) -> PPOModels:
    """The pre-update models with a fresh copy of the policy in `dtype`."""
    return replace(run.models, policy=copy.deepcopy(run.models.policy).to(dtype))


def exp_in(exp: Experience, dtype) -> Experience:
    """The Experience with its float tensors in `dtype` (the same values)."""
    floats = {
        f.name: getattr(exp, f.name).to(dtype)
        for f in fields(exp)
        if isinstance(getattr(exp, f.name), torch.Tensor)
        and getattr(exp, f.name).is_floating_point()
    }
    return replace(exp, **floats)


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for _, t in sorted(tensors.items())])


# ---------------------------------------------------------------- prompts and rollouts


@pytest.mark.parametrize("k", [1, 2, 3])
def test_prompt_batch_repeat_keeps_each_prompts_samples_adjacent(k):
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4]])  # [B=3, P=3], left padded
    mask = (ids != 0).long()
    repeated, group = PromptBatch(ids, mask, ["a", "b", "c"]).repeat(k)
    assert group.tolist() == [g for g in range(3) for _ in range(k)]
    assert repeated.texts == [t for t in "abc" for _ in range(k)]
    assert torch.equal(repeated.input_ids, ids[group]) and torch.equal(
        repeated.attention_mask, mask[group]
    )


def test_rollout_rows_are_whole_adjacent_groups(step5):
    rollout, exp = step5.rollout, step5.exp
    assert len(rollout) == PROMPTS * K
    assert rollout.group.tolist() == [g for g in range(PROMPTS) for _ in range(K)]
    prompts = step5.prompts
    assert len(prompts.texts) == PROMPTS and len(set(prompts.texts)) == PROMPTS
    width = rollout.query_ids.shape[1]  # all-padding columns trimmed
    for row, g in enumerate(rollout.group.tolist()):
        assert rollout.prompts[row] == prompts.texts[g]
        assert torch.equal(rollout.query_ids[row], prompts.input_ids[g, -width:])
        assert torch.equal(rollout.query_mask[row], prompts.attention_mask[g, -width:])
    assert prompts.attention_mask[:, :-width].sum() == 0
    assert torch.equal(exp.group, rollout.group)  # Experience.join keeps the groups
    # GRPO: the advantages of a group sum to 0 over its samples (each is constant per row)
    seq_adv = exp.advantages[:, 0]  # every row has ≥ 1 valid token
    sums = torch.zeros(PROMPTS).index_add(0, exp.group, seq_adv)
    assert sums.abs().max() < 1e-5, sums


# ---------------------------------------------------------------- minibatches


def _shuffled_groups(num_groups: int, k: int, seed: int) -> torch.Tensor:
    """Long[G·k] group ids 3, 10, 17, … in a random (non-contiguous) row order."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.arange(num_groups).repeat_interleave(k) * 7 + 3
    return ids[torch.randperm(num_groups * k, generator=gen)]


def _assert_whole_groups(chunks: list[torch.Tensor], group: torch.Tensor, k: int) -> None:
    """Every row exactly once; each chunk holds whole groups, their rows adjacent."""
    rows = torch.cat(chunks)
    assert sorted(rows.tolist()) == list(range(len(group)))
    for chunk in chunks:
        ids = group[chunk].tolist()
        assert all(n == k for n in Counter(ids).values()), ids
        runs = [g for i, g in enumerate(ids) if i == 0 or ids[i - 1] != g]
        assert len(runs) == len(set(ids)), f"a group's rows are not adjacent: {ids}"


@pytest.mark.parametrize(
    "num_groups,k,num_minibatches",
    [(4, 2, 2), (5, 3, 2), (6, 4, 4), (7, 2, 7), (3, 5, 1), (8, 1, 3)],
)
def test_group_minibatches_never_split_a_group(num_groups, k, num_minibatches):
    group = _shuffled_groups(num_groups, k, seed=num_groups * 10 + k)
    torch.manual_seed(0)
    chunks = minibatches.group_minibatches(group, len(group), num_minibatches, "cpu")
    assert len(chunks) == num_minibatches
    _assert_whole_groups(chunks, group, k)
    groups_per_chunk = [len(c) // k for c in chunks]
    assert max(groups_per_chunk) - min(groups_per_chunk) <= 1  # balanced split of the groups


def test_group_minibatches_without_groups_is_a_split_permutation():
    torch.manual_seed(0)
    chunks = minibatches.group_minibatches(None, 7, 3, "cpu")
    assert [len(c) for c in chunks] == [3, 2, 2]
    assert sorted(torch.cat(chunks).tolist()) == list(range(7))


def test_update_reshuffles_whole_groups_every_epoch(step5, monkeypatch):
    """Through `ppo_update`: each epoch draws new minibatches, all made of whole groups."""
    drawn, real = [], minibatches.group_minibatches

    def recording(*args):
        drawn.append(real(*args))
        return drawn[-1]

    monkeypatch.setattr(minibatches, "group_minibatches", recording)
    models = policy_copy(step5)
    stats = run_update(step5, models, RecordingOps(models.policy), ppo_epochs=3, num_minibatches=2)
    assert stats.epochs_done == 3 and len(drawn) == 3
    for chunks in drawn:
        assert len(chunks) == 2
        _assert_whole_groups(chunks, step5.exp.group, K)
    orders = [tuple(torch.cat(chunks).tolist()) for chunks in drawn]
    assert len(set(orders)) > 1, orders


def test_more_minibatches_than_groups_is_rejected(step5):
    """8 rows but 4 prompts: 5 minibatches would split a group (one-line error, before any step)."""
    models = policy_copy(step5)
    with pytest.raises(ValueError, match=r"model\.update\.num_minibatches: 5 .*groups\) 4") as err:
        run_update(step5, models, RecordingOps(models.policy), num_minibatches=5)
    assert "\n" not in str(err.value)
    run_update(step5, models, RecordingOps(models.policy), num_minibatches=PROMPTS)  # 1 group each


# ---------------------------------------------------------------- micro-batching


@pytest.mark.parametrize("micro", [2, 3])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "token_sum_norm"])
def test_micro_batching_leaves_the_update_unchanged(step5, within_torch_error, aggregation, micro):
    """micro_batch_size 2 or 3 (which cuts through groups) vs the whole minibatch: the same
    first-step gradients and the same parameter change after 2 epochs × 2 minibatches (SGD),
    judged against the float64 update."""
    runs = {}
    for name, size, dtype in [("ours", micro, torch.float32), ("torch", None, torch.float32),
                              ("exact", None, torch.float64)]:  # fmt: skip
        models = policy_copy(step5, dtype)
        before = {n: p.detach().clone() for n, p in models.policy.named_parameters()}
        ops = RecordingOps(models.policy)
        run_update(
            step5,
            models,
            ops,
            exp=exp_in(step5.uneven, dtype),
            ppo_epochs=2,
            num_minibatches=2,
            micro_batch_size=size,
            loss_aggregation=aggregation,
        )
        delta = {n: p.detach() - before[n] for n, p in models.policy.named_parameters()}
        runs[name] = (_flat(ops.first_grads), _flat(delta))
    assert runs["exact"][0].abs().max() > 1e-4  # the gradient is not trivially 0
    for i, what in enumerate(("first-step gradients", "parameter change")):
        within_torch_error(
            runs["ours"][i], runs["torch"][i], runs["exact"][i], name=f"{aggregation} {what}"
        )
