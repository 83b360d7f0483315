"""Shared stage-module conventions: tokenizer access and export-dir resolution (all 3 stages);
constructor signature and plain hparams (`StageModule.save_plain_hparams`)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from rlhf_lightning.models.loading import ModelSpec
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.modules.reward import RewardExportConfig, RewardModule
from rlhf_lightning.modules.reward_losses import RewardLossConfig
from rlhf_lightning.modules.sft import SFTModule, SFTSampleConfig
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


def _field_docstrings(cls) -> dict[str, bool]:
    """Field name → whether a string literal follows it in the dataclass body."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    found = {}
    for stmt, after in zip(body, [*body[1:], None]):
        if isinstance(stmt, ast.AnnAssign):
            documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            found[stmt.target.id] = documented and isinstance(after.value.value, str)
    return found


CONVENTION_STAGES = [SFTModule, RewardModule, PPOModule]


@pytest.mark.parametrize("stage", CONVENTION_STAGES, ids=lambda c: c.__name__)
def test_constructor_convention(stage):
    """`model_spec: ModelSpec`, then config dataclasses with a docstring per field, then export_dir."""
    hints = typing.get_type_hints(stage.__init__)
    names = [n for n in inspect.signature(stage.__init__).parameters if n != "self"]
    assert names[0] == "model_spec" and hints["model_spec"] is ModelSpec
    assert names[-1] == "export_dir"
    for name in names[1:-1]:
        (config_cls,) = [t for t in typing.get_args(hints[name]) if t is not type(None)]
        assert dataclasses.is_dataclass(config_cls), name
        docs = _field_docstrings(config_cls)
        assert set(docs) == {f.name for f in dataclasses.fields(config_cls)}, name
        assert all(docs.values()), (name, docs)


def test_hparams_are_plain_and_load_with_weights_only(tiny_config, tmp_path):
    spec = ModelSpec(config=tiny_config(20))
    modules = [
        SFTModule(spec, samples=SFTSampleConfig(num=2)),
        RewardModule(spec, loss=RewardLossConfig(center_coef=0.5), export=RewardExportConfig()),
    ]
    for module in modules:
        saved = dict(module.hparams)
        assert not [k for k, v in saved.items() if dataclasses.is_dataclass(v)]
        assert saved["model_spec"] == dataclasses.asdict(spec)
        torch.save(saved, tmp_path / "hparams.pt")
        assert torch.load(tmp_path / "hparams.pt", weights_only=True) == saved
    assert modules[0].hparams["samples"] == dataclasses.asdict(SFTSampleConfig(num=2))
    assert modules[1].loss_cfg.center_coef == 0.5  # the dataclass itself is what the module uses
    assert modules[1].hparams["loss"]["center_coef"] == 0.5


def test_negative_center_coef_names_its_key(tiny_config):
    with pytest.raises(ValueError, match=r"^model\.loss\.center_coef: must be >= 0, got -1"):
        RewardModule(ModelSpec(config=tiny_config(20)), loss={"center_coef": -1.0})
