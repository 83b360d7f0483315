"""Critic-free estimators (GRPO, RLOO, REINFORCE++) in PPOModule on a tiny Llama: learning, no
critic anywhere (module, optimizers, checkpoints), config errors, KL in the reward or the loss,
PPO-ptx and LoRA, sample tables and per-group tags, resume equivalence.

The scenarios (which samples earn reward, when the policy leaves the reference) come from fixed
seeds chosen with torch's sampler, so the modules here keep `fast_cpu_sampling: false`."""

from __future__ import annotations

import math
from dataclasses import replace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import rlhf_lightning.modules.ppo as ppo_module
import rlhf_lightning.ppo.advantages as advantages_step
from rlhf_lightning.models.loading import ModelSpec
from rlhf_lightning.modules.common import OptimConfig
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.ppo.config import (
    CriticConfig,
    GenerationConfig,
    KLConfig,
    MonitorConfig,
    RewardConfig,
    UpdateConfig,
)
from rlhf_lightning.ppo.distributed import LOCAL
from rlhf_lightning.ppo.reporting import _group_stats, sample_rows
from tests.ppo.test_estimators import STEP4_SHAPED, _step4, _step4_inputs
from tests.ppo.test_ppo_module import TOY, _datamodule, _module, _trainer

ESTIMATORS = ["grpo", "rloo", "reinforce_pp"]


def _critic_free(tokenizer, config, advantage, k=4, **update):
    upd = {"ppo_epochs": 2, "num_minibatches": 2, "micro_batch_size": 4, "advantage": advantage}
    upd.update(update)
    return _module(
        tokenizer,
        config,
        generation=GenerationConfig(
            max_new_tokens=8, samples_per_prompt=k, fast_cpu_sampling=False
        ),
        update=UpdateConfig(**upd),
        optim=OptimConfig(lr=3e-3, min_lr_ratio=1.0),
    )


def _assert_no_critic(module: PPOModule) -> None:
    """No critic or value head: not built, not registered, not optimised (one optimizer, holding
    exactly the policy's trainable parameters)."""
    assert module.critic_kind == "none"
    assert module.critic is None and module.value_head is None and module.models.critic is None
    names = [name for name, _ in module.named_parameters()]
    assert not any("critic" in n or "value_head" in n for n in names), names
    optimizers = module.trainer.optimizers
    assert len(optimizers) == 1
    optimised = {id(p) for g in optimizers[0].param_groups for p in g["params"]}
    assert optimised == {id(p) for p in module.policy.parameters() if p.requires_grad}


@pytest.mark.parametrize("advantage", ESTIMATORS)
def test_reward_rises_without_a_critic(tmp_path, tiny_tokenizer, tiny_config, advantage):
    pl.seed_everything(0)
    module = _critic_free(tiny_tokenizer, tiny_config, advantage)
    dm = _datamodule(tiny_tokenizer, n_prompts=32, batch_size=4)
    _trainer(tmp_path, max_epochs=2).fit(module, datamodule=dm)
    _assert_no_critic(module)
    rewards = [h["ppo/objective/reward"] for h in module.history]
    assert len(rewards) == 16
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.15, rewards
    for h in module.history:
        assert "ppo/loss/value" not in h and "ppo/value/explained_variance" not in h
        assert 0.0 <= h["ppo/objective/zero_advantage_groups"] <= 1.0
        assert h["ppo/objective/group_reward_std"] >= 0.0
        assert math.isfinite(h["ppo/loss/policy"]) and math.isfinite(h["ppo/loss/total"])
    # the policy learns to say "good" in every sample: more groups tie at the top (at 0 first)
    assert module.history[0]["ppo/objective/zero_advantage_groups"] < 1.0


# ---------------------------------------------------------------- config errors


def _build(advantage="grpo", k=4, kind="auto", reward_model=None):
    reward = (
        RewardConfig(function=TOY) if reward_model is None else RewardConfig(model=reward_model)
    )
    return PPOModule(
        model_spec=ModelSpec(config={"model_type": "llama"}),
        reward=reward,
        generation=GenerationConfig(samples_per_prompt=k),
        update=UpdateConfig(advantage=advantage),
        critic=CriticConfig(kind=kind),
    )


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"advantage": "grpo", "k": 1}, r"model\.generation\.samples_per_prompt: 1 .*grpo"),
        ({"advantage": "rloo", "k": 1}, r"model\.generation\.samples_per_prompt: 1 .*rloo"),
        ({"advantage": "reinforce_pp", "k": 0}, r"model\.generation\.samples_per_prompt: 0"),
        ({"advantage": "gae", "kind": "none"}, r"model\.critic\.kind: 'none' leaves GAE"),
        ({"kind": "reward_model", "reward_model": "rm"}, r"model\.critic\.kind: 'reward_model'"),
        ({"advantage": "rloo", "kind": "policy_copy"}, r"model\.critic\.kind: 'policy_copy'"),
        ({"advantage": "reinforce_pp", "kind": "value_head"}, r"model\.critic\.kind: 'value_he"),
        ({"advantage": "ppo"}, r"model\.update\.advantage: 'ppo' is not one of"),
    ],
)
def test_config_errors_are_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        _build(**kw)
    assert "\n" not in str(err.value)


def test_critic_kind_resolves_to_none_and_k1_is_fine_for_reinforce_pp():
    for advantage in ESTIMATORS:
        assert _build(advantage, k=2).critic_kind == "none"
        assert _build(advantage, k=2, kind="none").critic_kind == "none"
    assert _build("reinforce_pp", k=1).critic_kind == "none"  # no group statistic
    assert _build("gae", k=4).critic_kind == "policy_copy"  # GAE with groups keeps its critic


# ---------------------------------------------------------------- KL in the reward or the loss


def _fit_recording_step4(root, tokenizer, config, monkeypatch, advantage, mode, iterations):
    """Fit `iterations` iterations (1 epoch × 1 minibatch each) and record step 4's calls."""
    seen, real = [], advantages_step.estimate_advantages

    def recording(scores, stats, rollout, cfg, kl_coef, ranks):
        out = real(scores, stats, rollout, cfg, kl_coef, ranks)
        seen.append({"scores": scores, "stats": stats, "rollout": rollout, "beta": kl_coef,
                     "out": out})  # fmt: skip
        return out

    monkeypatch.setattr(advantages_step, "estimate_advantages", recording)
    pl.seed_everything(0)
    module = _module(
        tokenizer,
        config,
        generation=GenerationConfig(
            max_new_tokens=8, samples_per_prompt=4, fast_cpu_sampling=False
        ),
        kl=KLConfig(coef=0.1, estimator="k3", mode=mode),
        update=UpdateConfig(advantage=advantage, ppo_epochs=1, num_minibatches=1),
        optim=OptimConfig(lr=1e-2, min_lr_ratio=1.0),
    )
    dm = _datamodule(tokenizer, n_prompts=4 * iterations, batch_size=4)
    _trainer(root, limit_train_batches=iterations).fit(module, datamodule=dm)
    return module, seen


@pytest.mark.parametrize("advantage", ESTIMATORS)
def test_kl_in_the_reward_or_in_the_loss(tmp_path, tiny_tokenizer, tiny_config, monkeypatch,
                                         advantage):  # fmt: skip
    """`kl.mode: reward`: step 4 gets β, the sequence reward is shaped − β·Σ kl, no KL loss.
    `kl.mode: loss`: step 4 gets β = 0 (the advantages ignore the KL) and the loss holds
    β · k3: on iteration 2 (the policy has moved away from the reference) the logged KL loss is
    the rollout's token-mean k3 — one minibatch at ratio 1, so it is computed on the same tokens
    with π_θ = π_old up to float32 noise (|Δ log π| ≲ 5e-7 per token; rel 1e-3 is ≥ 100×)."""
    module, seen = _fit_recording_step4(
        tmp_path / "reward", tiny_tokenizer, tiny_config, monkeypatch, advantage, "reward", 1
    )
    call = seen[-1]
    mask = call["rollout"].response_mask
    seq_kl = (call["stats"].kl * mask).sum(1)  # [B]
    assert call["beta"] == 0.1
    expected = call["scores"].shaped - 0.1 * seq_kl
    torch.testing.assert_close(call["out"].rewards.sum(-1), expected, atol=1e-6, rtol=1e-6)
    assert "ppo/loss/kl" not in module.history[0]

    module, seen = _fit_recording_step4(
        tmp_path / "loss", tiny_tokenizer, tiny_config, monkeypatch, advantage, "loss", 2
    )
    assert [call["beta"] for call in seen] == [0.0, 0.0]
    call, h = seen[-1], module.history[-1]
    mask = call["rollout"].response_mask
    assert torch.equal(call["out"].rewards.sum(-1), call["scores"].shaped)  # no KL in the reward
    rollout_k3 = float((call["stats"].kl * mask).sum() / mask.sum())
    assert rollout_k3 > 1e-6  # iteration 2: the policy differs from the reference
    assert h["ppo/loss/kl"] == pytest.approx(rollout_k3, rel=1e-3)
    assert h["ppo/loss/total"] == pytest.approx(
        h["ppo/loss/policy"] + 0.1 * h["ppo/loss/kl"], abs=1e-6
    )  # ent_coef 0, no value loss


# ---------------------------------------------------------------- PPO-ptx, LoRA


def test_grpo_with_ptx_and_a_lora_policy(tmp_path, tiny_tokenizer, tiny_config):
    pl.seed_everything(0)
    spec = ModelSpec(
        config=tiny_config(len(tiny_tokenizer)),
        lora={"r": 4, "target_modules": ["q_proj", "v_proj"]},
    )
    module = _module(
        tiny_tokenizer,
        tiny_config,
        model_spec=spec,
        generation=GenerationConfig(
            max_new_tokens=8, samples_per_prompt=4, fast_cpu_sampling=False
        ),
        update=UpdateConfig(
            advantage="grpo", ppo_epochs=2, num_minibatches=2, ptx_coef=0.5, ptx_batch_size=4
        ),
        optim=OptimConfig(lr=1e-2),
    )
    dm = _datamodule(tiny_tokenizer, n_prompts=12, batch_size=4, demos=True)
    _trainer(tmp_path, limit_train_batches=3).fit(module, datamodule=dm)
    _assert_no_critic(module)
    assert module.reference is None  # the LoRA policy with adapters disabled
    assert len(module.history) == 3
    assert module.history[0]["ppo/objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert module.history[-1]["ppo/objective/kl"] != 0.0  # the adapters moved
    for h in module.history:
        for key in ("ppo/loss/policy", "ppo/loss/ptx", "ppo/loss/total"):
            assert math.isfinite(h[key]), key
        assert h["ppo/loss/ptx"] > 0
    # 3 iterations × 2 epochs × 2 minibatches = 12 ptx batches of 4: 4 passes over 12 demos
    # (the position stays at the end of the 4th pass, as in test_ppo_module's PPO-ptx test)
    assert module.ptx_position == {"epoch": 3, "consumed": 3}


# ---------------------------------------------------------------- sample tables, group tags


def test_sample_rows_and_group_tags_hand_worked():
    """Two prompts × 2 (shaped 1, 3 | 2, 2): 3 rows asked → the 2 whole groups, spreads 2 and 0;
    sequence rewards 0.5, 2.75 | 1.75, 1.75 → mean group std (1.125·√2 + 0) / 2, half tied."""
    scores, stats, rollout = _step4_inputs()
    rows = sample_rows(rollout, scores, stats, 3)
    assert [r["group"] for r in rows] == [0, 0, 1, 1]
    assert [r["group_reward_spread"] for r in rows] == [2.0, 2.0, 0.0, 0.0]
    assert [r["reward"] for r in rows] == STEP4_SHAPED
    assert list(rows[0]) == ["group", "prompt", "response", "reward", "reward_raw", "gold", "kl",
                             "group_reward_spread"]  # fmt: skip
    std, tied = _group_stats(rollout, _step4("grpo"), LOCAL)
    assert std == pytest.approx(1.125 * math.sqrt(2) / 2, abs=1e-12) and tied == 0.5
    single = replace(rollout, group=None)
    assert "group" not in sample_rows(single, scores, stats, 3)[0]
    assert _group_stats(single, _step4("reinforce_pp"), LOCAL) == (None, None)


def test_sample_table_rows_carry_group_and_spread(tmp_path, tiny_tokenizer, tiny_config,
                                                  monkeypatch):  # fmt: skip
    tables = []
    monkeypatch.setattr(
        ppo_module, "log_text_table", lambda lg, tag, rows, step: tables.append(rows)
    )
    pl.seed_everything(0)
    module = _critic_free(tiny_tokenizer, tiny_config, "rloo", k=3)
    module.monitor_cfg = MonitorConfig(sample_every=1, sample_rows=4, histogram_every=0)
    dm = _datamodule(tiny_tokenizer, n_prompts=8, batch_size=4)
    _trainer(tmp_path, logger=CSVLogger(str(tmp_path)), limit_train_batches=2).fit(
        module, datamodule=dm
    )
    assert len(tables) == 2
    for rows in tables:
        assert len(rows) == 6  # 4 rows asked, k = 3: the first 2 whole groups
        by_group: dict[int, list[float]] = {}
        for row in rows:
            by_group.setdefault(row["group"], []).append(row["reward"])
        assert all(len(v) == 3 for v in by_group.values())
        for row in rows:
            rewards = by_group[row["group"]]
            assert row["group_reward_spread"] == pytest.approx(max(rewards) - min(rewards))


# ---------------------------------------------------------------- resume


def _resume_run(root, tokenizer, config, ckpt_in=None, saver=None):
    pl.seed_everything(0)
    module = _module(
        tokenizer,
        config,
        reward=RewardConfig(function=TOY, function_kwargs={"word": "good"}, normalize="running"),
        generation=GenerationConfig(
            max_new_tokens=8, samples_per_prompt=4, fast_cpu_sampling=False
        ),
        update=UpdateConfig(advantage="grpo", ppo_epochs=1, num_minibatches=2, micro_batch_size=3),
        kl=KLConfig(coef=0.05, target=1.0, horizon=100),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, total_steps=8),
        export_dir=str(root / "export"),
    )
    trainer = _trainer(
        root, callbacks=[saver] if saver else [], enable_checkpointing=saver is not None
    )
    trainer.fit(
        module, datamodule=_datamodule(tokenizer, n_prompts=8, batch_size=2), ckpt_path=ckpt_in
    )
    return module


def test_resume_of_a_critic_free_run_gives_identical_metrics(tmp_path, tiny_tokenizer, tiny_config):
    """GRPO, k = 4, 2 prompts per iteration: 2 iterations + checkpoint + resume + 2 == 4 straight.
    One optimizer × 2 minibatches = 2 optimizer steps per iteration (a PPO run with its critic
    takes 4): step 4 = after iteration 2. The checkpoint holds no critic weights or state."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    straight = _resume_run(tmp_path / "a", tiny_tokenizer, tiny_config, saver=saver)
    assert len(straight.history) == 4 and straight.trainer.global_step == 8
    _assert_no_critic(straight)
    ckpt = next((tmp_path / "ckpt").glob("*step=4.ckpt"))
    state = torch.load(ckpt, weights_only=False)
    assert state["ppo_state"]["iteration"] == 2
    assert not any("critic" in k or "value_head" in k for k in state["state_dict"])
    assert len(state["optimizer_states"]) == 1 and len(state["lr_schedulers"]) == 1
    resumed = _resume_run(tmp_path / "b", tiny_tokenizer, tiny_config, ckpt_in=str(ckpt))
    assert len(resumed.history) == 4
    for a, b in zip(straight.history, resumed.history):
        keys = [k for k in a if not k.startswith("ppo/perf/")]
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert "ppo/objective/group_reward_std" in straight.history[-1]
    assert straight.kl_ctl.value == resumed.kl_ctl.value != 0.05
    assert straight.running.state_dict() == resumed.running.state_dict()
    for (name, p), (_, q) in zip(
        straight.policy.state_dict().items(), resumed.policy.state_dict().items()
    ):
        assert torch.equal(p, q), name
