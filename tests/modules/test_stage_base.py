"""Shared stage-module conventions: tokenizer access and export-dir resolution (all 3 stages)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest

from rlhf_lightning.models.loading import ModelSpec
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.modules.reward import RewardModule
from rlhf_lightning.modules.sft import SFTModule
from rlhf_lightning.ppo.config import RewardConfig


def _modules(tiny_config, export_dir=None):
    spec = ModelSpec(config=tiny_config(20))
    reward = RewardConfig(function="rlhf_lightning.ppo.toy:word_frequency")
    return [
        SFTModule(spec, export_dir=export_dir),
        RewardModule(spec, export_dir=export_dir),
        PPOModule(spec, reward=reward, export_dir=export_dir),
    ]


def test_tokenizer_is_settable_and_missing_one_is_a_one_line_error(tiny_config, tiny_tokenizer):
    for module in _modules(tiny_config):
        name = type(module).__name__
        with pytest.raises(
            RuntimeError, match=f"^{name} needs a tokenizer: attach an RLHFDataModule"
        ):
            module.tokenizer  # noqa: B018
        module.tokenizer = tiny_tokenizer
        assert module.tokenizer is tiny_tokenizer


def test_export_dir_rule_is_the_same_for_every_stage(tiny_config, tmp_path):
    for module in _modules(tiny_config, export_dir=str(tmp_path / "out")):
        assert module.resolved_export_dir() == tmp_path / "out"
    for module in _modules(tiny_config):
        assert module.resolved_export_dir() == Path(".") / "export"  # no trainer
        trainer = pl.Trainer(logger=False, default_root_dir=str(tmp_path), accelerator="cpu")
        module.trainer = trainer
        assert module.resolved_export_dir() == tmp_path / "export"  # no logger folder
