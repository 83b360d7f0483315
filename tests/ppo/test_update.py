"""Step 5 on its own: `ppo_update` on a fixed `Experience`, with `LocalOps` and via the module.

The Experience is the one a tiny PPOModule's `training_step` builds in steps 1–4 (captured by
wrapping `ppo_update` for one iteration), together with a snapshot of the models taken just before
the module's own update, so every test starts from the exact state the module path saw.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import lightning.pytorch as pl
import pytest
import torch

import rlhf_lightning.ppo.update as step
from rlhf_lightning.data.datamodule import RLHFDataModule
from rlhf_lightning.data.sources import DataSource
from rlhf_lightning.models.loading import ModelSpec
from rlhf_lightning.modules.common import OptimConfig, build_optimizer, fused_allowed
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.ppo import minibatches
from rlhf_lightning.ppo.compile import configure_forwards
from rlhf_lightning.ppo.config import (
    ComputeConfig,
    GenerationConfig,
    KLConfig,
    RewardConfig,
    UpdateConfig,
)
from rlhf_lightning.ppo.experience import Experience
from rlhf_lightning.ppo.models import PPOModels

WORDS = "the movie was great and the acting was wonderful . the plot was boring".split()
TOY = "rlhf_lightning.ppo.toy:word_frequency"
PERMUTATION_SEED = 123  # torch.manual_seed before every ppo_update: same minibatch permutation
OPTIM = OptimConfig(lr=3e-3, warmup_steps=1, total_steps=10)
# clipping off: LocalOps does not clip, the module clips in on_before_optimizer_step
UPDATE = UpdateConfig(ppo_epochs=2, num_minibatches=2, micro_batch_size=2, max_grad_norm=None)


@dataclass
class ModuleRun:
    """One training_step of a tiny PPOModule, with what its step 5 was given."""

    module: PPOModule
    trainer: pl.Trainer
    models: PPOModels  # snapshot (deep-copied policy and critic) taken right before step 5
    exp: Experience  # B = 8 prompts, R ≤ 8 response tokens
    kwargs: dict  # upd, kl, gen, kl_coef exactly as the module passed them
    stats: step.UpdateStats  # what the module's own update returned
    first_micro: minibatches.FirstMicroBatch  # epoch 0's minibatches, without step 3's critic graph


def _copy_models(models: PPOModels) -> PPOModels:
    """The bundle with its trainable models deep-copied (the frozen reference is shared), their
    forwards planned like the originals' (padding-free where those are)."""
    copied = replace(
        models, policy=copy.deepcopy(models.policy), critic=copy.deepcopy(models.critic)
    )
    configure_forwards(copied, ComputeConfig(), samples_per_prompt=1)  # the module's default
    return copied


@pytest.fixture
def module_run(tmp_path, tiny_tokenizer, tiny_config, monkeypatch) -> ModuleRun:
    """Fit a tiny PPOModule for one iteration, capturing step 5's input on the way."""
    prompts = [{"prompt": " ".join(WORDS[i % 7 : i % 7 + 2 + i % 4])} for i in range(16)]
    dm = RLHFDataModule(
        tokenizer=tiny_tokenizer,
        prompts=DataSource(records=prompts, val_fraction=0),
        batch_size=8,
        seed=3,
    )
    pl.seed_everything(0)
    module = PPOModule(
        model_spec=ModelSpec(config=tiny_config(len(tiny_tokenizer))),
        reward=RewardConfig(function=TOY, function_kwargs={"word": "good"}, normalize="none"),
        generation=GenerationConfig(max_new_tokens=8),
        kl=KLConfig(coef=0.01),
        update=UPDATE,
        optim=OPTIM,
        export_dir=str(tmp_path / "export"),
    )
    captured, real = {}, step.ppo_update

    def capturing_update(models, exp, upd, kl, gen, **kw):
        captured.update(models=_copy_models(models), exp=exp)
        captured["kwargs"] = {"upd": upd, "kl": kl, "gen": gen, "kl_coef": kw["kl_coef"]}
        captured["first_micro"] = kw["first_micro"].with_values(None)
        torch.manual_seed(PERMUTATION_SEED)
        captured["stats"] = real(models, exp, upd, kl, gen, **kw)
        return captured["stats"]

    with monkeypatch.context() as patch:  # undone before the tests call ppo_update
        patch.setattr(step, "ppo_update", capturing_update)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=1,
            limit_train_batches=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path),
        )
        trainer.fit(module, datamodule=dm)
    return ModuleRun(module, trainer, **captured)


def _update(
    run: ModuleRun, models: PPOModels, ops, exp=None, first_micro=None, **upd_changes
) -> step.UpdateStats:
    """`ppo_update` on the captured Experience (or `exp`) with the module's settings (epoch 0's
    minibatches from `first_micro` when given, else drawn after `PERMUTATION_SEED`)."""
    kw = dict(run.kwargs)
    kw["upd"] = replace(kw["upd"], **upd_changes)
    torch.manual_seed(PERMUTATION_SEED)
    return step.ppo_update(
        models,
        run.exp if exp is None else exp,
        kw.pop("upd"),
        kw.pop("kl"),
        kw.pop("gen"),
        ops=ops,
        first_micro=first_micro,
        **kw,
    )


def _plain_ops(models: PPOModels) -> step.LocalOps:
    """LocalOps on plain torch AdamW optimizers for the policy and the critic."""
    policy_params = [p for p in models.policy.parameters() if p.requires_grad]
    return step.LocalOps(
        [torch.optim.AdamW(policy_params, lr=1e-3), torch.optim.AdamW(models.critic.parameters())]
    )


def _trainable(models: PPOModels) -> dict[str, torch.Tensor]:
    """Detached copies of the policy's and critic's parameters, by prefixed name."""
    named = [("policy", models.policy), ("critic", models.critic)]
    return {
        f"{prefix}.{name}": p.detach().clone()
        for prefix, model in named
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def test_local_update_starts_at_ratio_one_and_trains(module_run):
    """Ratio 1 before any step; every parameter moves; all epochs run without target_kl.

    Tolerance: the sampler's π_old (KV-cached `generate` logits) and the training forward are two
    float32 computations of the same log-probs. Measured on this input: mean |ratio − 1| of the
    first minibatch 3.0e-8, largest per-token |Δ log π| 4.8e-7, and torch's own float32 error of
    these log-probs against a float64 forward 4.0e-7; 1e-5 leaves a margin of 20× over the worst
    token (the statistic is a mean over ≤ 32 tokens, not a large reduction)."""
    models = _copy_models(module_run.models)
    before = _trainable(models)
    assert module_run.kwargs["upd"].target_kl is None
    stats = _update(module_run, models, _plain_ops(models), ppo_epochs=3)
    assert abs(stats.ratio_at_start - 1.0) <= 1e-5, stats.ratio_at_start
    assert stats.epochs_done == 3 and not stats.early_stop
    after = _trainable(models)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, unchanged
    assert stats.ratio_mean != 1.0  # later minibatches saw an updated policy


def test_local_ops_equal_the_module_path(module_run):
    """LocalOps on a copy of the pre-update models == the module's LightningOps update.

    Same optimizers (`build_optimizer` with the module's OptimConfig and fused flag) and
    schedulers, same minibatches (epoch 0's as the module drew them before step 3, then the same
    permutation seed), clipping off in both. The module's first critic micro-batch reused step 3's
    forward (`compute.reuse_critic_forward`), the copy runs that forward itself: bit-identical."""
    run = module_run
    models = _copy_models(run.models)
    fused = fused_allowed(run.trainer)
    opts, scheds = zip(
        *(
            build_optimizer([p for p in m.parameters() if p.requires_grad], OPTIM, None, fused)
            for m in (models.policy, models.critic)
        )
    )
    assert [o.defaults["fused"] for o in run.trainer.optimizers] == [
        o.defaults["fused"] for o in opts
    ]
    stats = _update(
        run, models, step.LocalOps(list(opts), list(scheds)), first_micro=run.first_micro
    )
    upd = run.kwargs["upd"]
    # Lightning counts each optimizer's step: the module path went through LightningOps.step
    assert run.trainer.global_step == 2 * upd.ppo_epochs * upd.num_minibatches
    assert stats == run.stats
    ours, module = _trainable(models), _trainable(run.module.models)
    assert ours.keys() == module.keys()
    for name in ours:
        assert torch.equal(ours[name], module[name]), name
    assert any(not torch.equal(ours[n], v) for n, v in _trainable(run.models).items())


def test_ratio_check_fires_on_shifted_old_logprobs(module_run):
    """old log-probs + 1 on valid tokens: ratio e⁻¹ ≠ 1, raised before any optimizer step."""
    exp = module_run.exp
    shifted = replace(exp, old_logprobs=exp.old_logprobs + exp.response_mask.float())
    models = _copy_models(module_run.models)
    before = _trainable(models)
    with pytest.raises(step.RatioMismatchError, match="ratio_check_tol"):
        _update(module_run, models, _plain_ops(models), exp=shifted, ratio_check_tol=1e-2)
    after = _trainable(models)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_more_minibatches_than_rows_is_rejected(module_run):
    models = _copy_models(module_run.models)
    too_many = len(module_run.exp) + 1
    with pytest.raises(ValueError, match=r"model\.update\.num_minibatches"):
        _update(module_run, models, _plain_ops(models), num_minibatches=too_many)
