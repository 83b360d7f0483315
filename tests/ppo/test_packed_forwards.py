"""Exact fast paths of the PPO forwards: group packing (`ppo.packing`) and EOS suppression.

Packed and padded forwards are two float32 routes to the same numbers; each is judged with the
float32 rule of tests/conftest.py: the packed result must be within twice the padded float32
forward's error against a float64 padded forward of the same model and tokens (gradients too).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from rlhf_lightning.models.reward_export import score_rows
from rlhf_lightning.ppo import packing
from rlhf_lightning.ppo.compile import ForwardPlan, configure_module, plan_of
from rlhf_lightning.ppo.config import ComputeConfig
from rlhf_lightning.ppo.generation import SuppressEOS, generate
from rlhf_lightning.ppo.logprobs import critic_values, response_forward
from rlhf_lightning.ppo.models import critic_from_reward_model
from rlhf_lightning.ppo.rollout import Rollout

VOCAB = 61


def _config(**extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **extra,
    )


def _grouped_rollout(k: int = 3, prompts: int = 3, steps: int = 6, seed: int = 0) -> Rollout:
    """`prompts` × k rows: left-padded prompts of different lengths repeated k times, responses
    right-padded after random lengths (one sample copies another's first tokens)."""
    gen = torch.Generator().manual_seed(seed)
    width = 9
    query = torch.randint(3, VOCAB, (prompts, width), generator=gen)  # [G, P]
    lengths = torch.tensor([width, 4, 7])[:prompts]
    query_mask = (torch.arange(width)[None] >= width - lengths[:, None]).long()  # [G, P]
    query, query_mask = query.repeat_interleave(k, 0), query_mask.repeat_interleave(k, 0)
    response = torch.randint(3, VOCAB, (prompts * k, steps), generator=gen)  # [B, R]
    response[1, :3] = response[0, :3]  # a shared first response tokens: longer common prefix
    ends = torch.randint(1, steps + 1, (prompts * k,), generator=gen)
    response_mask = (torch.arange(steps)[None] < ends[:, None]).long()  # [B, R]
    group = torch.arange(prompts).repeat_interleave(k)
    return Rollout(query, query_mask, response, response_mask, [""] * len(query), None, group)


def _padded(model):
    """`model` with a padded, eager plan (the reference route)."""
    configure_module("policy", "lm", model, ComputeConfig(pack_groups=False, padding_free=False))
    return model


def test_pack_rows_layout_by_hand():
    """Two groups: prompt [5, 6] with responses [7, 8] and [7, 9 | pad]; prompt [pad, 3] with [4]."""
    rollout = Rollout(
        torch.tensor([[5, 6], [5, 6], [0, 3]]),
        torch.tensor([[1, 1], [1, 1], [0, 1]]),
        torch.tensor([[7, 8], [7, 9], [4, 0]]),
        torch.tensor([[1, 1], [1, 1], [1, 0]]),
        ["", "", ""],
        None,
        torch.tensor([0, 0, 1]),
    )
    packed = packing.pack_rows(rollout, rollout.group)
    # group 0 shares [5, 6, 7] (capped at the shortest row − 1 = 3); own tokens [8] and [9]
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9], [3, 4, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 3], [0, 1, 0, 0, 0]]
    allowed = packed.allowed[:, 0].int().tolist()
    assert allowed[0] == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 0, 1],  # sample 2's token sees the prefix and itself, not sample 1's token
    ]
    assert allowed[1] == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],  # padding sees only itself
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ]
    # predicting positions: row 0 tokens 7, 8 ← packed 1, 2; row 1: 7, 9 ← 1, 2; row 2: 4 ← 5 + 0
    assert packed.predict.tolist() == [[1, 2], [1, 2], [5, 0]]
    assert packed.last.tolist() == [3, 4, 6]


def test_shares_prefixes():
    assert not packing.shares_prefixes(None)
    assert not packing.shares_prefixes(torch.tensor([0, 1, 2]))
    assert packing.shares_prefixes(torch.tensor([0, 0, 1]))


def _lm_stats(model, rollout, with_hidden=False):
    out = response_forward(model, rollout, temperature=0.7, with_hidden=with_hidden)
    return out


def test_packed_lm_equals_padded(within_torch_error):
    """Log-probs, entropy and (value-head) hidden states of packed == padded (float32 rule)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    exact = _padded(copy.deepcopy(model).double())
    padded = _padded(copy.deepcopy(model))
    plan = configure_module("policy", "lm", model, ComputeConfig())
    assert plan.pack and plan.packs(_grouped_rollout().group)
    rollout = _grouped_rollout()
    mask = rollout.response_mask.bool()
    with torch.no_grad():
        got = _lm_stats(model, rollout, with_hidden=True)
        own = _lm_stats(padded, rollout, with_hidden=True)
        ref = _lm_stats(exact, rollout, with_hidden=True)
    for key in ("logprobs", "entropy"):
        within_torch_error(got[key], own[key], ref[key], name=key)
    within_torch_error(got["hidden"][mask], own["hidden"][mask], ref["hidden"][mask], name="hidden")


def test_packed_lm_gradients_equal_padded(within_torch_error):
    """∂(Σ w·log π)/∂θ of the packed forward == the padded one's (the update's backward)."""
    torch.manual_seed(1)
    model = LlamaForCausalLM(_config()).train()
    exact = _padded(copy.deepcopy(model).double())
    padded = _padded(copy.deepcopy(model))
    configure_module("policy", "lm", model, ComputeConfig())
    rollout = _grouped_rollout(seed=1)
    weights = torch.randn(rollout.response_ids.shape, generator=torch.Generator().manual_seed(2))
    grads = []
    for m in (model, padded, exact):
        logp = _lm_stats(m, rollout)["logprobs"]
        (logp * weights.to(logp.dtype)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    within_torch_error(*grads, name="gradient")


def test_packed_critic_and_reward_equal_padded(within_torch_error):
    """Critic values and reward-model scores of packed == padded (float32 rule)."""
    torch.manual_seed(2)
    rm = AutoModelForSequenceClassification.from_config(_config(num_labels=1)).eval()
    critic = critic_from_reward_model(rm, None).eval()
    rollout = _grouped_rollout(k=2, seed=3)
    exact_critic = copy.deepcopy(critic).double()
    assert configure_module("critic", "critic", critic, ComputeConfig()).pack
    with torch.no_grad():
        got = critic_values(critic, rollout)
        own = critic_values(copy.deepcopy(critic), rollout)  # no plan: padded
        ref = critic_values(exact_critic, rollout)
        within_torch_error(got, own, ref, name="values")
        packed = packing.pack_rows(rollout, rollout.group)
        scores = packing.packed_scores(rm.model, rm.score, packed)
        own_scores = score_rows(rm, rollout.input_ids, rollout.attention_mask)
        ref_scores = score_rows(
            copy.deepcopy(rm).double(), rollout.input_ids, rollout.attention_mask
        )
    within_torch_error(scores, own_scores, ref_scores, name="scores")


class _ScaledLM(LlamaForCausalLM):
    """Logits scaled after the head (like a soft-capped model): packing must refuse it."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 2 * out.logits
        return out


def test_packing_refused_where_packed_differs():
    torch.manual_seed(3)
    assert packing.packing_matches("lm", LlamaForCausalLM(_config()))
    scaled = _ScaledLM(_config())
    assert not packing.packing_matches("lm", scaled)
    with pytest.warns(UserWarning, match="stay padded"):
        plan = configure_module("policy", "lm", scaled, ComputeConfig())
    assert not plan.pack
    unplanned = torch.nn.Linear(2, 2)
    assert plan_of(unplanned) == ForwardPlan(unplanned)  # eager, padded


def test_suppress_eos_samples_like_min_new_tokens():
    """`SuppressEOS` gives the same samples and raw logits as transformers' `min_new_tokens`."""
    from transformers import GenerationConfig as HFGenerationConfig

    torch.manual_seed(4)
    model = LlamaForCausalLM(_config()).eval()
    with torch.no_grad():
        model.lm_head.weight[2] += 3.0  # make EOS (id 2) likely, so the suppression matters
    ids = torch.randint(3, VOCAB, (3, 5))
    mask = torch.tensor([[1] * 5, [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    base = dict(do_sample=True, max_new_tokens=8, eos_token_id=2, pad_token_id=0)
    outs = []
    for min_new, config in ((4, HFGenerationConfig(**base)), (0, HFGenerationConfig(**base))):
        if not min_new:
            config.min_new_tokens = 4  # transformers' own processor
        torch.manual_seed(5)
        outs.append(
            generate(
                model,
                ids,
                mask,
                generation_config=config,
                eos_token_id=2,
                pad_token_id=0,
                with_logprobs=True,
                min_new_tokens=min_new,
            )
        )
    ours, theirs = outs
    assert torch.equal(ours.response_ids, theirs.response_ids)
    assert torch.equal(ours.logprobs, theirs.logprobs)
    assert bool((ours.response_mask[:, :4] == 1).all())  # no EOS among the first 4 tokens
    scores = torch.zeros(2, VOCAB)
    suppress = SuppressEOS(prompt_width=5, min_new_tokens=2, eos_token_id=[2, 7])
    out = suppress(torch.zeros(2, 6, dtype=torch.long), scores)
    assert out[:, [2, 7]].eq(float("-inf")).all() and scores.eq(0).all()  # out of place
    assert suppress(torch.zeros(2, 7, dtype=torch.long), scores) is scores


def test_ppo_module_packs_groups_like_padded(tiny_tokenizer, tiny_config, monkeypatch):
    """Steps 1–3 of a k = 2 PPOModule (shared value head: packed hidden states too) give the same
    statistics with `compute.pack_groups` on (the packed path runs) and off."""
    from rlhf_lightning.data.datamodule import RLHFDataModule
    from rlhf_lightning.data.sources import DataSource
    from rlhf_lightning.models.loading import ModelSpec
    from rlhf_lightning.modules.ppo import PPOModule
    from rlhf_lightning.ppo import generation, logprobs
    from rlhf_lightning.ppo.config import CriticConfig, GenerationConfig, RewardConfig
    from rlhf_lightning.ppo.rollout import PromptBatch

    records = [{"prompt": f"the movie was {w} and"} for w in "great boring long fine".split()]
    dm = RLHFDataModule(
        tokenizer=tiny_tokenizer,
        prompts=DataSource(records=records * 2, val_fraction=0),
        batch_size=4,
        seed=0,
    )
    dm.setup("fit")
    batch = next(iter(dm.dataloader("prompt", "train")))
    calls = []
    real = packing.pack_rows
    monkeypatch.setattr(packing, "pack_rows", lambda *a: calls.append(1) or real(*a))
    stats = {}
    for pack in (True, False):
        torch.manual_seed(0)
        module = PPOModule(
            model_spec=ModelSpec(config=tiny_config(len(tiny_tokenizer))),
            reward=RewardConfig(
                function="rlhf_lightning.ppo.toy:word_frequency",
                function_kwargs={"word": "good"},
                normalize="none",
            ),
            generation=GenerationConfig(max_new_tokens=6, samples_per_prompt=2),
            critic=CriticConfig(kind="value_head"),
            compute=ComputeConfig(pack_groups=pack),
        )
        module.tokenizer = tiny_tokenizer
        module.configure_model()
        m, gen, kl = module.models, module.generation_cfg, module.kl_cfg
        calls.clear()
        torch.manual_seed(1)
        with torch.no_grad(), m.sampling_mode():
            rollout = generation.rollout(
                m, PromptBatch.from_batch(batch), gen, sampler_logprobs=False
            )
            stats[pack] = logprobs.logprobs_values(m, rollout, gen, kl)
        assert bool(calls) == pack  # policy + reference forwards packed only when asked
    for field in ("logprobs", "ref_logprobs", "entropy", "values"):
        a, b = getattr(stats[True], field), getattr(stats[False], field)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), field  # two float32 routes


def test_ptx_lm_head_only_from_the_first_label_gives_the_full_gradient(within_torch_error):
    """PPO-ptx evaluates the LM head from the first labelled column on: its loss and gradients are
    those of the full-logits NLL (float32 rule against the float64 full-logits route)."""
    from types import SimpleNamespace

    from rlhf_lightning.kernels import token_logprobs

    from rlhf_lightning.ppo.config import UpdateConfig
    from rlhf_lightning.ppo.losses import PPOStats
    from rlhf_lightning.ppo.update import LocalOps, _ptx_backward

    torch.manual_seed(6)
    model = LlamaForCausalLM(_config()).train()
    ids = torch.randint(3, VOCAB, (4, 10))
    attn = torch.ones_like(ids)
    attn[2, 8:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100  # prompts of 4–6 tokens are not labelled
    labels[1, :6] = -100
    labels[attn == 0] = -100
    batch = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    _ptx_backward(
        SimpleNamespace(policy=model),
        batch,
        UpdateConfig(ptx_coef=1.0, micro_batch_size=2),
        PPOStats(),
        LocalOps([]),
    )
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    grads = []
    for dtype in (torch.float32, torch.float64):
        full = copy.deepcopy(model).to(dtype)
        full.zero_grad(set_to_none=True)
        valid = labels[:, 1:] != -100
        logits = full(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
        logp = token_logprobs(logits, labels[:, 1:], mask=valid)
        (-(logp * valid).sum() / valid.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in full.parameters()]))
    within_torch_error(got, grads[0], grads[1], name="ptx gradient")
