"""Critic-free estimators (GRPO, RLOO, REINFORCE++) in PPOModule on a tiny Llama: learning,
no critic anywhere, group integrity, config errors."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from rlhf_lightning.modules.common import OptimConfig
from rlhf_lightning.ppo.config import CriticConfig, GenerationConfig, KLConfig, UpdateConfig
from tests.ppo.test_ppo_module import _datamodule, _module, _trainer


def _critic_free(tokenizer, config, advantage, k=4, **update):
    upd = {"ppo_epochs": 2, "num_minibatches": 2, "micro_batch_size": 4, "advantage": advantage}
    upd.update(update)
    return _module(
        tokenizer,
        config,
        generation=GenerationConfig(max_new_tokens=8, samples_per_prompt=k),
        update=UpdateConfig(**upd),
        optim=OptimConfig(lr=3e-3, min_lr_ratio=1.0),
    )


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce_pp"])
def test_reward_rises_without_a_critic(tmp_path, tiny_tokenizer, tiny_config, advantage):
    pl.seed_everything(0)
    module = _critic_free(tiny_tokenizer, tiny_config, advantage)
    dm = _datamodule(tiny_tokenizer, n_prompts=32, batch_size=4)
    _trainer(tmp_path, max_epochs=2).fit(module, datamodule=dm)
    assert module.critic is None and module.value_head is None
    assert not any("critic" in name or "value_head" in name for name, _ in module.named_parameters())
    rewards = [h["ppo/objective/reward"] for h in module.history]
    assert len(rewards) == 16
    print(advantage, [round(r, 3) for r in rewards])
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.15, rewards
    assert "ppo/loss/value" not in module.history[0]
    assert "ppo/objective/group_reward_std" in module.history[0]
