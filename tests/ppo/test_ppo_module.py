"""PPOModule end to end on a tiny Llama: learning, options, logging, resume equivalence."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from rlhf_lightning.data.datamodule import RLHFDataModule
from rlhf_lightning.data.sources import DataSource
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

WORDS = "the movie was great and the acting was wonderful . the plot was boring".split()
TOY = "rlhf_lightning.ppo.toy:word_frequency"


def _datamodule(tokenizer, n_prompts=64, batch_size=16, demos=False):
    prompts = [{"prompt": " ".join(WORDS[i % 7 : i % 7 + 2 + i % 4])} for i in range(n_prompts)]
    demo = None
    if demos:
        rows = [{"prompt": p["prompt"], "response": "good good"} for p in prompts[:16]]
        demo = DataSource(records=rows, val_fraction=0)
    return RLHFDataModule(
        tokenizer=tokenizer,
        prompts=DataSource(records=prompts, val_fraction=0),
        demonstrations=demo,
        batch_size=batch_size,
        seed=3,
    )


def _module(tokenizer, config, **kw):
    args = {
        "model_spec": ModelSpec(config=config(len(tokenizer))),
        "reward": RewardConfig(function=TOY, function_kwargs={"word": "good"}, normalize="none"),
        "generation": GenerationConfig(max_new_tokens=8),
        "kl": KLConfig(coef=0.01),
        "update": UpdateConfig(ppo_epochs=2, num_minibatches=2, micro_batch_size=4),
        "optim": OptimConfig(lr=3e-3, min_lr_ratio=1.0),
        "monitor": MonitorConfig(sample_every=5, histogram_every=5),
    }
    args.update(kw)
    return PPOModule(**args)


def _trainer(tmp_path, logger=False, **kw):
    args = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": logger,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "log_every_n_steps": 1,
    }
    args.update(kw)
    return pl.Trainer(**args)


def test_reward_rises_and_logs_tag_tree(tmp_path, tiny_tokenizer, tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    module = _module(tiny_tokenizer, tiny_config, export_dir=str(tmp_path / "export"))
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    _trainer(tmp_path, logger=logger, max_epochs=5).fit(
        module, datamodule=_datamodule(tiny_tokenizer)
    )
    rewards = [h["ppo/objective/reward"] for h in module.history]
    assert len(rewards) == 20
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.15 and last > 2 * first, rewards
    assert all(
        h["ppo/policy/ratio_at_start"] == pytest.approx(1.0, abs=1e-4) for h in module.history
    )
    assert (tmp_path / "export" / "config.json").exists()

    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "histograms": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "ppo/objective/reward",
        "ppo/objective/reward_raw",
        "ppo/objective/kl",
        "ppo/objective/kl_coef",
        "ppo/objective/entropy",
        "ppo/loss/policy",
        "ppo/loss/value",
        "ppo/loss/total",
        "ppo/policy/approxkl",
        "ppo/policy/clipfrac",
        "ppo/policy/ratio_mean",
        "ppo/policy/ratio_at_start",
        "ppo/value/clipfrac",
        "ppo/value/explained_variance",
        "ppo/value/mean",
        "ppo/returns/mean",
        "ppo/response/length_mean",
        "ppo/response/length_max",
        "ppo/perf/rollout_s",
        "ppo/perf/update_s",
        "ppo/perf/tokens_per_s",
    ):
        assert tag in scalars, tag
    assert all(t.startswith("ppo/") for t in scalars - {"epoch", "hp_metric"}), scalars
    assert len(events.Scalars("ppo/objective/reward")) == 20  # one point per PPO iteration
    assert "ppo/objective/reward_hist" in events.Tags()["histograms"]
    assert any("ppo/samples" in t for t in events.Tags()["tensors"])


def _run(tmp_path, tokenizer, config, ckpt_in=None, callbacks=(), n_prompts=64, max_epochs=1):
    pl.seed_everything(0)
    module = _module(
        tokenizer,
        config,
        update=UpdateConfig(ppo_epochs=1, num_minibatches=2, micro_batch_size=4),
        kl=KLConfig(coef=0.05, target=1.0, horizon=100),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, total_steps=8),
        export_dir=str(tmp_path / "export"),
    )
    trainer = _trainer(
        tmp_path,
        callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks),
        max_epochs=max_epochs,
    )
    trainer.fit(module, datamodule=_datamodule(tokenizer, n_prompts), ckpt_path=ckpt_in)
    return module


@pytest.mark.parametrize("n_prompts,max_epochs", [(64, 1), (32, 2)], ids=["mid_epoch", "epoch_end"])
def test_resume_gives_identical_metrics(
    tmp_path, tiny_tokenizer, tiny_config, n_prompts, max_epochs
):
    """4 iterations straight == resume from the checkpoint written after iteration 2 + 2 more.

    Batch 16: 64 prompts → the checkpoint is mid-epoch; 32 prompts → it is at an epoch's end."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    # 2 optimizers × 2 minibatches = 4 optimizer steps per iteration: step 8 = after iteration 2
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    kw = {"n_prompts": n_prompts, "max_epochs": max_epochs}
    straight = _run(tmp_path / "a", tiny_tokenizer, tiny_config, callbacks=[saver], **kw)
    assert len(straight.history) == 4
    ckpt = next((tmp_path / "ckpt").glob("*step=8.ckpt"))
    state = torch.load(ckpt, weights_only=True)
    assert not any(k.startswith("reward_model.") for k in state["state_dict"])
    assert state["ppo_state"]["iteration"] == 2
    resumed = _run(tmp_path / "c", tiny_tokenizer, tiny_config, ckpt_in=str(ckpt), **kw)
    assert len(resumed.history) == 4
    for a, b in zip(straight.history, resumed.history):
        keys = [k for k in a if not k.startswith("ppo/perf/")]
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert straight.kl_ctl.value == resumed.kl_ctl.value != 0.05
    for (name, p), (_, q) in zip(
        straight.policy.state_dict().items(), resumed.policy.state_dict().items()
    ):
        assert torch.equal(p, q), name


def test_ratio_mismatch_is_reported(tmp_path, tiny_tokenizer, tiny_config, monkeypatch):
    import rlhf_lightning.ppo.update as step

    real = step.response_forward

    def shifted(*args, **kwargs):
        out = real(*args, **kwargs)
        out["logprobs"] = out["logprobs"] + 0.5  # as if the update pass used another temperature
        return out

    monkeypatch.setattr(step, "response_forward", shifted)
    module = _module(tiny_tokenizer, tiny_config)
    with pytest.raises(step.RatioMismatchError, match="ratio_at_start"):
        _trainer(tmp_path, limit_train_batches=1).fit(
            module, datamodule=_datamodule(tiny_tokenizer)
        )


def test_options_ptx_value_head_kl_loss_full(tmp_path, tiny_tokenizer, tiny_config):
    pl.seed_everything(0)
    module = _module(
        tiny_tokenizer,
        tiny_config,
        critic=CriticConfig(kind="value_head"),
        kl=KLConfig(coef=0.1, estimator="full", mode="loss"),
        update=UpdateConfig(
            ppo_epochs=2,
            num_minibatches=2,
            micro_batch_size=3,
            dual_clip=3.0,
            ptx_coef=0.5,
            ptx_batch_size=4,
            target_kl=10.0,
            ent_coef=0.01,
        ),
        reward=RewardConfig(
            function=TOY,
            function_kwargs={"word": "good"},
            gold=TOY,
            gold_kwargs={"word": "the"},
            normalize="running",
            missing_eos_penalty=0.1,
            clip=5.0,
        ),
    )
    dm = _datamodule(tiny_tokenizer, n_prompts=32, demos=True)
    drawn, ptx_batch = [], module._ptx_batch  # record what the update step is given
    module._ptx_batch = lambda: drawn.append(ptx_batch()) or drawn[-1]
    _trainer(tmp_path, limit_train_batches=2).fit(module, datamodule=dm)
    assert module.critic is None and module.value_head is not None
    assert len(module.history) == 2
    for h in module.history:
        for key in (
            "ppo/loss/ptx",
            "ppo/loss/kl",
            "ppo/objective/gold",
            "ppo/policy/dual_clipfrac",
        ):
            assert math.isfinite(h[key]), key
    assert module.history[0]["ppo/loss/ptx"] > 0
    # 2 iterations × 2 epochs × 2 minibatches = 8 ptx batches = 2 passes over 16 demos / 4
    assert module.ptx_position == {"epoch": 1, "consumed": 4}
    # the order of the former `_ptx_batches`: randperm(seed + epoch), full batches of 4
    loader = dm.dataloader("demonstration", "train", batch_size=4, shuffle=False)
    data = loader.dataset
    assert len(drawn) == 8
    for k, batch in enumerate(drawn):
        order = torch.randperm(16, generator=torch.Generator().manual_seed(dm.seed + k // 4))
        old = loader.collate_fn([data[i] for i in order[(k % 4) * 4 : (k % 4) * 4 + 4].tolist()])
        assert torch.equal(batch["input_ids"], old["input_ids"]), k
    trainable = {
        id(p) for opt in module.trainer.optimizers for g in opt.param_groups for p in g["params"]
    }
    assert not any(id(p) in trainable for p in module.reference.parameters())
    assert all(id(p) in trainable for p in module.value_head.parameters())


def test_lora_policy_uses_adapters_disabled_as_reference(tmp_path, tiny_tokenizer, tiny_config):
    pl.seed_everything(0)
    spec = ModelSpec(
        config=tiny_config(len(tiny_tokenizer)),
        lora={"r": 4, "target_modules": ["q_proj", "v_proj"]},
    )
    module = _module(tiny_tokenizer, tiny_config, model_spec=spec, optim=OptimConfig(lr=1e-2))
    _trainer(tmp_path, limit_train_batches=2).fit(module, datamodule=_datamodule(tiny_tokenizer))
    assert module.reference is None
    assert module.history[0]["ppo/objective/kl"] == pytest.approx(
        0.0, abs=1e-6
    )  # adapters start at 0
    assert module.history[1]["ppo/objective/kl"] != 0.0


def test_reward_model_export_and_critic_init(tmp_path, tiny_tokenizer, tiny_config):
    from rlhf_lightning.models.loading import load_sequence_classifier
    from rlhf_lightning.models.reward_export import export_reward_model, score_rows

    torch.manual_seed(1)
    rm = load_sequence_classifier(ModelSpec(config=tiny_config(len(tiny_tokenizer))))
    rm_dir = export_reward_model(rm, tiny_tokenizer, tmp_path / "rm", {"mean": 0.3, "std": 2.0})
    module = _module(
        tiny_tokenizer,
        tiny_config,
        reward=RewardConfig(model=str(rm_dir), missing_eos_penalty=1.0),
        update=UpdateConfig(ppo_epochs=1, num_minibatches=1),
    )
    _trainer(tmp_path, limit_train_batches=1).fit(module, datamodule=_datamodule(tiny_tokenizer))
    h = module.history[0]
    assert math.isfinite(h["ppo/objective/reward"]) and math.isfinite(h["ppo/objective/reward_raw"])

    # the critic starts as the normalised reward model: V(last token) = (score − mean) / std
    fresh = _module(tiny_tokenizer, tiny_config, reward=RewardConfig(model=str(rm_dir)))
    fresh.tokenizer = tiny_tokenizer
    fresh.configure_model()
    ids = torch.tensor([[2, 5, 6, 7], [0, 2, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    raw = score_rows(fresh.reward_model, ids, mask)
    values = fresh.critic(ids, mask)[:, -1]
    assert torch.allclose(values, (raw - 0.3) / 2.0, atol=1e-5)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="exactly one"):
        PPOModule(model_spec=ModelSpec(config={"model_type": "llama"}), reward=RewardConfig())
    with pytest.raises(ValueError, match="model.kl.estimator"):
        PPOModule(
            model_spec=ModelSpec(config={"model_type": "llama"}),
            reward=RewardConfig(function=TOY),
            kl=KLConfig(estimator="k9"),
        )
    from rlhf_lightning.scorers import load_scorer

    with pytest.raises(ValueError, match="model.reward.function"):
        load_scorer("no_colon_here", "model.reward.function")


def test_update_is_invariant_to_micro_batch_size(tmp_path, tiny_tokenizer, tiny_config):
    """Same rollout, same steps: micro-batches of 1, 3 or the whole minibatch agree.

    Micro-batching changes the float32 summation order of the gradients (~1e-7 relative). AdamW
    divides by |g| + eps, so in entries whose gradient is ~0 it amplifies that difference by up
    to 1/eps: with eps=1e-8 the parameters differed by 1.6e-6–5.8e-6 depending on the CPU's
    ATen kernels (AVX-512 / AVX2 / scalar), too close to 1e-5. With eps=1e-6 the measured
    difference is ≤ 5.2e-7 on all three (losses: ≤ 2e-7 relative), so atol=1e-5 and
    rel=1e-4 keep a margin of 20× or more."""
    runs = []
    for micro in (None, 3, 1):
        pl.seed_everything(0)
        module = _module(
            tiny_tokenizer,
            tiny_config,
            update=UpdateConfig(ppo_epochs=2, num_minibatches=2, micro_batch_size=micro),
            optim=OptimConfig(lr=3e-3, min_lr_ratio=1.0, eps=1e-6),
        )
        _trainer(tmp_path, limit_train_batches=1).fit(
            module, datamodule=_datamodule(tiny_tokenizer)
        )
        runs.append(module)
    base = runs[0]
    for other in runs[1:]:
        for key in ("ppo/loss/policy", "ppo/loss/value", "ppo/policy/approxkl", "ppo/value/mean"):
            assert other.history[0][key] == pytest.approx(base.history[0][key], rel=1e-4, abs=1e-6)
        for p, q in zip(base.policy.parameters(), other.policy.parameters()):
            assert torch.allclose(p, q, atol=1e-5)
        for p, q in zip(base.critic.parameters(), other.critic.parameters()):
            assert torch.allclose(p, q, atol=1e-5)
