"""PPO rollout paths and precision: π_old from the sampler vs a policy forward, trimmed prompt
padding, and training under Lightning's mixed-precision plugins.

Two float32 routes to the same statistics (KV-cached sampler vs full forward, trimmed vs padded
rows) are compared with the float32 rule of tests/conftest.py: the route under test is within
twice the error of the plain route against a float64 forward of the same model and tokens. The
scenarios (responses ending at different lengths) come from seeds chosen with torch's sampler,
so the modules keep `fast_cpu_sampling: false`.
"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch

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

PROMPTS = [{"prompt": f"the movie was {w}"} for w in "great boring long short fine odd".split()] * 8


def _datamodule(tokenizer, batch_size=16):
    source = DataSource(records=PROMPTS, val_fraction=0)
    return RLHFDataModule(tokenizer=tokenizer, prompts=source, batch_size=batch_size, seed=3)


def _module(tokenizer, config, **kw):
    """A tiny-Llama PPOModule rewarded for the word "good"."""
    args = {
        "model_spec": ModelSpec(config=config(len(tokenizer))),
        "reward": RewardConfig(
            function="rlhf_lightning.ppo.toy:word_frequency",
            function_kwargs={"word": "good"},
            normalize="none",
        ),
        "generation": GenerationConfig(max_new_tokens=8, fast_cpu_sampling=False),
        "kl": KLConfig(coef=0.01),
        "update": UpdateConfig(ppo_epochs=1, num_minibatches=2, micro_batch_size=4),
        "optim": OptimConfig(lr=3e-3, min_lr_ratio=1.0),
        "monitor": MonitorConfig(sample_every=0, histogram_every=0),
    }
    args.update(kw)
    return PPOModule(**args)


def _steps_1_to_3(module, batch):
    """Steps 1–3 of `module.training_step` on `batch`: (Rollout, TokenStats)."""
    from rlhf_lightning.ppo import generation, logprobs, scoring
    from rlhf_lightning.ppo.distributed import LOCAL
    from rlhf_lightning.ppo.rollout import PromptBatch

    m, gen, kl = module.models, module.generation_cfg, module.kl_cfg
    with torch.no_grad(), m.sampling_mode():
        sampler = logprobs.uses_sampler_logprobs(m, gen, kl)
        rollout = generation.rollout(
            m, PromptBatch.from_batch(batch), gen, sampler_logprobs=sampler
        )
        scoring.score(m, rollout, module.reward_cfg, module.running, LOCAL)
        return rollout, logprobs.logprobs_values(m, rollout, gen, kl)


def _float64(model):
    """A float64 copy of `model` (forward hooks included): the exact reference forward."""
    return copy.deepcopy(model).double()


def _favour_eos(module, tokenizer, boost=2.0):
    """Add `boost` to the EOS logit of the policy's LM head (sampler and forward alike), so that
    responses end early at different lengths."""
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.eos_token_id] = boost
    module.policy.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)


@pytest.mark.parametrize("estimator", ["k1", "full"])
def test_sampler_logprobs_match_a_policy_forward(
    tiny_tokenizer, tiny_config, estimator, monkeypatch, within_torch_error
):
    """π_old from generate's logits == π_old from a second policy forward (same samples), with
    responses ending early at different lengths in generation micro-batches; the policy forward of
    step 3 is skipped unless the exact-KL estimator needs the policy logits."""
    from rlhf_lightning.kernels import kl_penalty

    import rlhf_lightning.ppo.logprobs as logprobs
    from rlhf_lightning.ppo.logprobs import response_forward

    calls = []
    real = logprobs.response_forward
    monkeypatch.setattr(
        logprobs, "response_forward", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    dm = _datamodule(tiny_tokenizer, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.dataloader("prompt", "train")))
    rollouts, stats = {}, {}
    for sampled in (True, False):
        torch.manual_seed(0)
        module = _module(
            tiny_tokenizer,
            tiny_config,
            generation=GenerationConfig(
                max_new_tokens=8,
                temperature=0.7,
                sampler_logprobs=sampled,
                micro_batch_size=3,
                fast_cpu_sampling=False,
            ),
            kl=KLConfig(coef=0.01, estimator=estimator),
        )
        module.tokenizer = tiny_tokenizer
        module.configure_model()
        _favour_eos(module, tiny_tokenizer)
        calls.clear()
        torch.manual_seed(1)
        rollouts[sampled], stats[sampled] = _steps_1_to_3(module, batch)
        assert len(calls) == (0 if sampled and estimator != "full" else 3)  # 3 micro-batches
    ra, a, b = rollouts[True], stats[True], stats[False]
    assert torch.equal(ra.response_ids, rollouts[False].response_ids)
    assert (ra.sampled is not None) == (estimator != "full") and rollouts[False].sampled is None
    lengths = ra.response_mask.sum(1)  # [8]
    chunk_widths = {int(lengths[i : i + 3].max()) for i in (0, 3, 6)}
    assert len(set(lengths.tolist())) >= 3 and len(chunk_widths) >= 2, lengths
    policy_side = () if estimator == "k1" else ("logprobs", "entropy", "kl")  # "full": a forward
    for key in ("ref_logprobs", "values", *policy_side):  # the same computation in both runs
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    if estimator == "k1":  # sampler vs policy forward: both float32, judged against float64
        with torch.no_grad():
            exact = response_forward(_float64(module.policy), ra, temperature=0.7)
        exact["kl"] = (
            kl_penalty(exact["logprobs"], a.ref_logprobs.double(), "k1") * ra.response_mask
        )
        for key in ("logprobs", "entropy", "kl"):
            within_torch_error(getattr(a, key), getattr(b, key), exact[key], name=key)
    padding = ra.response_mask == 0
    assert padding.any() and a.logprobs[padding].abs().sum() == 0  # padding stays 0
    assert (a.logprobs[~padding] < 0).all()


def test_sampler_logprobs_default_is_float32_only(tiny_tokenizer, tiny_config):
    """null = sampler log-probs for a float32 policy; a policy forward in 16-bit or autocast."""
    from rlhf_lightning.ppo.logprobs import uses_sampler_logprobs as uses

    module = _module(tiny_tokenizer, tiny_config)
    module.tokenizer = tiny_tokenizer
    module.configure_model()

    def uses_sampler_logprobs(module):
        return uses(module.models, module.generation_cfg, module.kl_cfg)

    assert module.generation_cfg.sampler_logprobs is None
    assert uses_sampler_logprobs(module)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_sampler_logprobs(module)
    before = torch.get_float32_matmul_precision()
    try:  # TF32 / bf16-internal float32 matmuls break the sampler/trainer agreement too
        torch.set_float32_matmul_precision("high")
        assert not uses_sampler_logprobs(module)
    finally:
        torch.set_float32_matmul_precision(before)
    assert uses_sampler_logprobs(module)
    module.policy.model.layers[0].to(torch.bfloat16)  # one 16-bit layer is enough
    assert not uses_sampler_logprobs(module)
    module.policy.to(torch.bfloat16)
    assert not uses_sampler_logprobs(module)
    module.generation_cfg.sampler_logprobs = True  # an explicit choice wins
    assert uses_sampler_logprobs(module)
    module.kl_cfg.estimator = "full"  # ... except where the policy's logits are needed
    assert not uses_sampler_logprobs(module)


def test_trimmed_micro_batch_gives_the_same_statistics(
    tiny_tokenizer, tiny_config, within_torch_error
):
    """A micro-batch of short prompts runs without their shared left padding: same log-probs,
    entropy and values as the full-width rows (positions come from the attention mask), within
    twice the full-width float32 error against a float64 forward."""
    from rlhf_lightning.ppo.logprobs import critic_values, response_forward
    from rlhf_lightning.ppo.rollout import Rollout

    module = _module(tiny_tokenizer, tiny_config)
    module.tokenizer = tiny_tokenizer
    module.configure_model()
    torch.manual_seed(0)
    query = torch.randint(5, 40, (3, 10))
    query_mask = torch.ones_like(query)
    query_mask[0, :7] = query_mask[1, :4] = 0  # rows 0 and 1 share 4 padding columns
    query = query.masked_fill(query_mask == 0, tiny_tokenizer.pad_token_id)
    response = torch.randint(5, 40, (3, 5))
    rollout = Rollout(query, query_mask, response, torch.ones_like(response), ["p"] * 3)
    full = Rollout(
        query[:2], query_mask[:2], response[:2], torch.ones_like(response[:2]), ["p"] * 2
    )
    short = rollout.select(torch.tensor([0, 1]))
    assert short.query_ids.shape == (2, 6) and full.query_ids.shape == (2, 10)
    with torch.no_grad():
        a = response_forward(module.policy.eval(), full, temperature=1.0)
        b = response_forward(module.policy, short, temperature=1.0)
        exact = response_forward(_float64(module.policy), full, temperature=1.0)
        a["values"] = critic_values(module.critic.eval(), full)
        b["values"] = critic_values(module.critic, short)
        exact["values"] = critic_values(_float64(module.critic), full)
    for key in ("logprobs", "entropy", "values"):
        within_torch_error(b[key], a[key], exact[key], name=key)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_clips_unscaled_gradients(tmp_path, tiny_tokenizer, tiny_config, precision):
    """PPO trains under Lightning's mixed precision. Clipping happens in on_before_optimizer_step,
    after the 16-mixed loss scaler has unscaled the gradients (clipping in the loop would see
    gradients ×2**16); the optimizers are not fused there. 16-mixed uses a value head: one loss
    scaler cannot serve a separate critic's second optimizer (refused as a config error)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    norms = []
    critic = CriticConfig(kind="value_head" if precision == "16-mixed" else "auto")
    module = _module(tiny_tokenizer, tiny_config, update=UpdateConfig(ppo_epochs=1), critic=critic)
    real = module.clip_gradients

    def spy(optimizer, **kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return real(optimizer, **kwargs)

    module.clip_gradients = spy
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if precision == "16-mixed" else None
    plugin = MixedPrecision(
        precision, "cpu", scaler=scaler
    )  # Lightning maps 16-mixed to bf16 on CPU
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        plugins=[plugin],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=_datamodule(tiny_tokenizer))
    optimizers = 1 if precision == "16-mixed" else 2  # value head: one; separate critic: two
    assert len(norms) == 2 * optimizers  # 2 iterations × optimizers
    assert all(0 < n < 1e3 for n in norms), norms  # scaled gradients would be ~6.5e4× larger
    assert not any(opt.defaults["fused"] for opt in trainer.optimizers)
    assert all(math.isfinite(h["ppo/loss/total"]) for h in module.history)
