"""`compute.reuse_critic_forward`: step 3's critic forward of the update's first micro-batch is the
one the update trains on (same parameters, dropout off), so the update runs one critic forward
fewer and trains exactly as if it had run it itself.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import lightning.pytorch as pl
import pytest
import torch

import rlhf_lightning.ppo.update as step
from rlhf_lightning.data.datamodule import RLHFDataModule
from rlhf_lightning.data.sources import DataSource
from rlhf_lightning.models.loading import ModelSpec
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.ppo import generation, logprobs, minibatches
from rlhf_lightning.ppo.compile import configure_forwards
from rlhf_lightning.ppo.config import (
    ComputeConfig,
    GenerationConfig,
    KLConfig,
    RewardConfig,
    UpdateConfig,
)
from rlhf_lightning.ppo.experience import Experience
from rlhf_lightning.ppo.rollout import PromptBatch

WORDS = "the movie was great and the acting was wonderful . the plot was boring".split()
TOY = "rlhf_lightning.ppo.toy:word_frequency"
# 6 rows: 2 minibatches of 3, micro-batches of 2 → the first micro-batch is 2 of minibatch 0's rows
UPDATE = UpdateConfig(ppo_epochs=2, num_minibatches=2, micro_batch_size=2, max_grad_norm=None)


def _records(n: int) -> list[dict]:
    return [{"prompt": " ".join(WORDS[i % 7 : i % 7 + 2 + i % 4])} for i in range(n)]


def _module(tiny_tokenizer, tiny_config, **kwargs) -> PPOModule:
    return PPOModule(
        model_spec=ModelSpec(config=tiny_config(len(tiny_tokenizer))),
        reward=RewardConfig(function=TOY, function_kwargs={"word": "good"}, normalize="none"),
        generation=GenerationConfig(max_new_tokens=6),
        kl=KLConfig(coef=0.01),
        update=UPDATE,
        **kwargs,
    )


@pytest.fixture
def steps_1_to_3(tiny_tokenizer, tiny_config):
    """A tiny PPOModule's models (policy-copy critic) and a rollout of 6 prompts."""
    dm = RLHFDataModule(
        tokenizer=tiny_tokenizer,
        prompts=DataSource(records=_records(6), val_fraction=0),
        batch_size=6,
    )
    dm.setup("fit")
    batch = next(iter(dm.dataloader("prompt", "train")))
    module = _module(tiny_tokenizer, tiny_config)
    module.tokenizer = tiny_tokenizer
    module.configure_model()
    m, gen = module.models, module.generation_cfg
    with torch.no_grad(), m.sampling_mode():
        rollout = generation.rollout(m, PromptBatch.from_batch(batch), gen, sampler_logprobs=True)
    return m, rollout, gen, module.kl_cfg


def _step3(m, rollout, gen, kl, rows=None):
    """Step 3 as `PPOModule.training_step` runs it (no_grad, sampling mode)."""
    with torch.no_grad(), m.sampling_mode():
        return logprobs.logprobs_values(m, rollout, gen, kl, rows)


def test_plan_draws_the_minibatches_the_update_would_draw():
    torch.manual_seed(5)
    plan = minibatches.plan_first_micro_batch(None, 6, UPDATE, "cpu")
    torch.manual_seed(5)
    expected = minibatches.group_minibatches(None, 6, UPDATE.num_minibatches, "cpu")
    assert [c.tolist() for c in plan.minibatches] == [c.tolist() for c in expected]
    assert plan.rows.tolist() == expected[0][:2].tolist() and plan.values is None
    group = torch.tensor([0, 0, 1, 1, 2, 2])  # k = 2: whole groups, no micro-batching
    plan = minibatches.plan_first_micro_batch(
        group, 6, replace(UPDATE, micro_batch_size=None), "cpu"
    )
    assert plan.rows.tolist() == plan.minibatches[0].tolist()
    members = torch.isin(group, group[plan.rows]).nonzero().flatten()
    assert sorted(plan.rows.tolist()) == members.tolist()  # whole groups only
    with pytest.raises(ValueError, match=r"model\.update\.num_minibatches"):
        minibatches.plan_first_micro_batch(group, 6, replace(UPDATE, num_minibatches=4), "cpu")


def test_step3_keeps_the_graph_of_the_planned_rows_only(steps_1_to_3):
    m, rollout, gen, kl = steps_1_to_3
    rows = torch.tensor([4, 1])
    plain = _step3(m, rollout, gen, kl)
    with torch.no_grad(), m.sampling_mode():
        kept = logprobs.logprobs_values(m, rollout, gen, kl, rows)
        assert not m.critic.training  # back in the eval mode of steps 1–3 after its train-mode run
    assert plain.values_graph is None
    graph = kept.values_graph  # [2, R]
    assert graph.requires_grad and graph.grad_fn is not None
    assert torch.equal(graph.detach(), kept.values[rows])
    for field in ("logprobs", "ref_logprobs", "entropy", "kl"):
        assert torch.equal(getattr(plain, field), getattr(kept, field)), field
    # the same values; rows computed in another micro-batch may round differently
    torch.testing.assert_close(kept.values, plain.values, atol=1e-6, rtol=1e-5)
    graph.sum().backward()
    assert all(p.grad is not None for p in m.critic.parameters() if p.requires_grad)


def _experience(rollout, tokens) -> Experience:
    mask = rollout.response_mask.float()
    gen = torch.Generator().manual_seed(7)
    advantages = torch.randn(mask.shape, generator=gen) * mask
    returns = tokens.values + torch.randn(mask.shape, generator=gen) * mask
    return Experience(
        rollout.query_ids,
        rollout.query_mask,
        rollout.response_ids,
        rollout.response_mask,
        tokens.logprobs,
        tokens.ref_logprobs,
        tokens.values,
        advantages,
        returns,
    )


def _copies(m):
    copied = replace(m, policy=copy.deepcopy(m.policy), critic=copy.deepcopy(m.critic))
    configure_forwards(copied, ComputeConfig(), samples_per_prompt=1)
    return copied


def _train(models, exp, first_micro, gen, kl) -> tuple[dict, int]:
    """`ppo_update` with plain AdamW; (trained critic + policy parameters, critic forwards run)."""
    calls = []
    hook = models.critic.trunk.register_forward_hook(lambda *_: calls.append(1))
    params = [models.policy.parameters(), models.critic.parameters()]
    ops = step.LocalOps([torch.optim.AdamW(p, lr=1e-2) for p in params])
    torch.manual_seed(11)  # epoch 1's permutation
    step.ppo_update(models, exp, UPDATE, kl, gen, kl_coef=0.01, ops=ops, first_micro=first_micro)
    hook.remove()
    trained = {f"policy.{n}": p.detach().clone() for n, p in models.policy.named_parameters()}
    trained.update({f"critic.{n}": p.detach().clone() for n, p in models.critic.named_parameters()})
    return trained, len(calls)


def test_update_on_the_reused_forward_equals_running_it(steps_1_to_3):
    """One critic forward fewer, bit-identical training (as `test_update` measured for the module)."""
    m, rollout, gen, kl = steps_1_to_3
    plan = minibatches.plan_first_micro_batch(None, len(rollout), UPDATE, "cpu")
    reusing, own = _copies(m), _copies(m)
    tokens = _step3(reusing, rollout, gen, kl, plan.rows)
    exp = _experience(rollout, tokens)
    reused, reused_calls = _train(reusing, exp, plan.with_values(tokens.values_graph), gen, kl)
    ran, own_calls = _train(own, exp, plan, gen, kl)
    micro_batches = UPDATE.ppo_epochs * 2 * 2  # epochs × minibatches (3 rows) × micro (2 + 1)
    assert (reused_calls, own_calls) == (micro_batches - 1, micro_batches)
    assert ran.keys() == reused.keys()
    for name in ran:
        assert torch.equal(ran[name], reused[name]), name
    assert any(not torch.equal(ran[f"critic.{n}"], p) for n, p in m.critic.named_parameters())


def _update_on(m, rollout, gen, kl, tokens, first_micro) -> None:
    ops = step.LocalOps([torch.optim.AdamW(m.critic.parameters())])
    exp = _experience(rollout, tokens)
    step.ppo_update(m, exp, UPDATE, kl, gen, kl_coef=0.01, ops=ops, first_micro=first_micro)


def test_a_plan_for_other_rows_is_refused(steps_1_to_3):
    m, rollout, gen, kl = steps_1_to_3
    plan = minibatches.plan_first_micro_batch(None, len(rollout), UPDATE, "cpu")
    tokens = _step3(m, rollout, gen, kl, plan.rows)
    other = plan.minibatches[0][-2:]  # two rows as well, but not the first micro-batch's
    for wrong in (replace(plan, rows=other), replace(plan, minibatches=plan.minibatches[:1])):
        with pytest.raises(ValueError, match="not planned for this update"):
            _update_on(m, rollout, gen, kl, tokens, wrong.with_values(tokens.values_graph))


def test_values_of_other_rows_are_refused(steps_1_to_3):
    m, rollout, gen, kl = steps_1_to_3
    plan = minibatches.plan_first_micro_batch(None, len(rollout), UPDATE, "cpu")
    tokens = _step3(m, rollout, gen, kl, plan.rows[:1])  # one row: not the micro-batch's two
    with pytest.raises(ValueError, match="first micro-batch"):
        _update_on(m, rollout, gen, kl, tokens, plan.with_values(tokens.values_graph))


def _one_iteration(tiny_tokenizer, tiny_config, tmp_path, monkeypatch, reuse: bool) -> dict:
    """One PPOModule iteration: the token positions of every critic trunk call, every minibatch
    split drawn, the trained critic."""
    dm = RLHFDataModule(
        tokenizer=tiny_tokenizer,
        prompts=DataSource(records=_records(6), val_fraction=0),
        batch_size=6,
    )
    module = _module(
        tiny_tokenizer,
        tiny_config,
        compute=ComputeConfig(reuse_critic_forward=reuse),
        export_dir=str(tmp_path / f"export_{reuse}"),
    )
    positions, splits = [], []
    real_split = minibatches.group_minibatches

    def recording_split(*args):
        splits.append([chunk.tolist() for chunk in real_split(*args)])
        return [torch.tensor(chunk) for chunk in splits[-1]]

    def count(_module, args, kwargs, _out):
        positions.append((args[0] if args else kwargs["input_ids"]).numel())

    class CountCriticForwards(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.critic.trunk.register_forward_hook(count, with_kwargs=True)

    monkeypatch.setattr(minibatches, "group_minibatches", recording_split)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[CountCriticForwards()],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    monkeypatch.undo()
    assert module.history and module.history[-1]["ppo/loss/value"] > 0
    critic = {n: p.detach().clone() for n, p in module.critic.named_parameters()}
    return {"positions": positions, "splits": splits, "critic": critic}


def test_module_runs_the_first_micro_batch_through_the_critic_once(
    tiny_tokenizer, tiny_config, tmp_path, monkeypatch
):
    """Off: step 3 runs all rows, the update 8 micro-batches. On: step 3 runs the other rows,
    then the first micro-batch's (its positions once), the update the other 7 — on the same
    minibatches, to the same critic (up to the rounding of step 3's other micro-batches)."""
    on = _one_iteration(tiny_tokenizer, tiny_config, tmp_path, monkeypatch, reuse=True)
    off = _one_iteration(tiny_tokenizer, tiny_config, tmp_path, monkeypatch, reuse=False)
    (rest, kept, *on_update), (every, *off_update) = on["positions"], off["positions"]
    assert len(off_update) == UPDATE.ppo_epochs * 2 * 2  # epochs × minibatches × micro-batches
    assert rest + kept == every and kept == off_update[0] and on_update == off_update[1:]
    assert on["splits"] == off["splits"] and len(on["splits"]) == UPDATE.ppo_epochs
    for name, value in off["critic"].items():
        torch.testing.assert_close(on["critic"][name], value, msg=name)
