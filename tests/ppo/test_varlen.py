"""Padding-free forwards (`ppo.varlen`): real tokens packed into one row, attention per sequence.

Padding-free and padded forwards are two float32 routes to the same numbers; each is judged with
the float32 rule of tests/conftest.py: within twice the padded float32 forward's error against a
float64 padded forward of the same model and tokens (gradients too).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from rlhf_lightning.models.reward_export import score_rows
from rlhf_lightning.ppo import varlen
from rlhf_lightning.ppo.compile import configure_module, plan_of
from rlhf_lightning.ppo.config import ComputeConfig
from rlhf_lightning.ppo.logprobs import critic_values, response_forward
from rlhf_lightning.ppo.models import critic_from_reward_model
from rlhf_lightning.ppo.rollout import Rollout

VOCAB = 61
PADDED = ComputeConfig(pack_groups=False, padding_free=False)


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


def _rollout(rows: int = 4, width: int = 9, steps: int = 6, seed: int = 0) -> Rollout:
    """`rows` left-padded prompts of different lengths (one full width), responses right-padded
    after random lengths (one of a single token)."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randint(3, VOCAB, (rows, width), generator=gen)  # [B, P]
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    lengths[0] = width
    query_mask = (torch.arange(width)[None] >= width - lengths[:, None]).long()  # [B, P]
    response = torch.randint(3, VOCAB, (rows, steps), generator=gen)  # [B, R]
    ends = torch.randint(1, steps + 1, (rows,), generator=gen)
    ends[-1] = 1
    response_mask = (torch.arange(steps)[None] < ends[:, None]).long()  # [B, R]
    return Rollout(query, query_mask, response, response_mask, [""] * rows)


def _planned(model, kind: str = "lm", cfg: ComputeConfig = PADDED):
    configure_module("policy", kind, model, cfg)
    return model


def test_layout_by_hand():
    """Row 0 = [pad, pad, a], row 1 = [b, c, d]: packed [a, b, c, d]."""
    layout, real, starts = varlen.layout_of(torch.tensor([[0, 0, 1], [1, 1, 1]]))
    assert starts.tolist() == [0, 1]
    assert real.tolist() == [[False, False, True], [True, True, True]]
    assert layout.to_rows.tolist() == [[0, 0, 0], [1, 2, 3]]  # row 0 past its length → its token
    assert layout.to_packed.tolist() == [0, 3, 4, 5]  # slot (row, j) = row · 3 + j
    right = varlen.layout_of(torch.tensor([[1, 1, 0], [1, 1, 1]]))[0]  # right padding alike
    assert right.to_rows.tolist() == [[0, 1, 1], [2, 3, 4]]
    assert layout.lengths == (1, 3) and right.lengths == (2, 3)


@pytest.mark.parametrize("lengths", [(5,), (7, 1, 4), (3, 9, 9, 2)])
def test_sliced_attention_equals_padded_rows(within_torch_error, monkeypatch, lengths):
    """The CPU route (SDPA on each sequence's slice) and the padded-rows route (gather, one SDPA,
    scatter; the route elsewhere) give the same outputs and q/k/v gradients (GQA 4 / 2 heads,
    random upstream gradient), each within the float32 rule against the padded route in float64."""
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    layout = varlen.layout_of(mask)[0]
    gathered = replace(layout, lengths=())  # no lengths: the padded-rows route, also on CPU
    n = sum(lengths)
    module = torch.nn.Module().eval()
    qkv = [torch.randn(1, h, n, 8, dtype=torch.float64) for h in (4, 2, 2)]
    upstream = torch.randn(1, n, 4, 8, dtype=torch.float64)

    def run(route, dtype):
        inputs = [x.to(dtype).requires_grad_() for x in qkv]
        out, _ = varlen.varlen_attention(module, *inputs, None, **{varlen._LAYOUT_KEY: route})
        grads = torch.autograd.grad(out, inputs, upstream.to(dtype))
        return [out, *grads]

    sliced, real = [], varlen._sliced_attention
    monkeypatch.setattr(varlen, "_sliced_attention", lambda *a: sliced.append(1) or real(*a))
    exact = run(gathered, torch.float64)
    assert not sliced
    for name, ours, own, ref in zip(
        ("out", "dq", "dk", "dv"), run(layout, torch.float32), run(gathered, torch.float32), exact
    ):
        within_torch_error(ours, own, ref, name=name)
    assert len(sliced) == 1  # the float32 run with lengths took the sliced route


def test_varlen_lm_equals_padded(within_torch_error):
    """Log-probs, entropy and hidden states (value head) of padding-free == padded."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    exact = _planned(copy.deepcopy(model).double())
    padded = _planned(copy.deepcopy(model))
    plan = configure_module("policy", "lm", model, ComputeConfig())
    assert plan.padding_free and plan.route(None) == "varlen"
    rollout = _rollout()
    mask = rollout.response_mask.bool()
    with torch.no_grad():
        got, own, ref = (
            response_forward(m, rollout, temperature=0.7, with_hidden=True)
            for m in (model, padded, exact)
        )
    for key in ("logprobs", "entropy"):
        within_torch_error(got[key], own[key], ref[key], name=key)
    within_torch_error(got["hidden"][mask], own["hidden"][mask], ref["hidden"][mask], name="hidden")


def test_varlen_lm_gradients_equal_padded(within_torch_error):
    """∂(Σ w·log π)/∂θ of the padding-free forward == the padded one's (the update's backward)."""
    torch.manual_seed(1)
    model = LlamaForCausalLM(_config()).train()
    exact = _planned(copy.deepcopy(model).double())
    padded = _planned(copy.deepcopy(model))
    configure_module("policy", "lm", model, ComputeConfig())
    rollout = _rollout(seed=1)
    weights = torch.randn(rollout.response_ids.shape, generator=torch.Generator().manual_seed(2))
    grads = []
    for m in (model, padded, exact):
        logp = response_forward(m, rollout, temperature=1.0)["logprobs"]
        (logp * weights.to(logp.dtype)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    within_torch_error(*grads, name="gradient")


def test_varlen_critic_and_reward_equal_padded(within_torch_error):
    """Critic values (masked) and reward-model scores of padding-free == padded."""
    torch.manual_seed(2)
    rm = AutoModelForSequenceClassification.from_config(_config(num_labels=1)).eval()
    critic = critic_from_reward_model(rm, None).eval()
    exact_critic = copy.deepcopy(critic).double()
    rollout = _rollout(seed=3)
    assert configure_module("critic", "critic", critic, ComputeConfig()).padding_free
    with torch.no_grad():
        got = critic_values(critic, rollout)
        own = critic_values(copy.deepcopy(critic), rollout)  # no plan: padded
        ref = critic_values(exact_critic, rollout)
        within_torch_error(got, own, ref, name="values")
        scores = varlen.varlen_scores(rm.model, rm.score, rollout)
        own_scores = score_rows(rm, rollout.input_ids, rollout.attention_mask)
        ref_scores = score_rows(
            copy.deepcopy(rm).double(), rollout.input_ids, rollout.attention_mask
        )
    within_torch_error(scores, own_scores, ref_scores, name="scores")


def test_varlen_keeps_a_sliding_window(within_torch_error):
    """A Mistral with a 4-token window over rows of up to 15 tokens: padding-free == padded."""
    torch.manual_seed(4)
    config = MistralConfig(**{**_config().to_dict(), "sliding_window": 4, "model_type": "mistral"})
    model = MistralForCausalLM(config).eval()
    exact = _planned(copy.deepcopy(model).double())
    padded = _planned(copy.deepcopy(model))
    with pytest.warns(UserWarning, match="pack_groups"):  # a 4-D mask would drop the window
        plan = configure_module("policy", "lm", model, ComputeConfig())
    assert plan.padding_free and not plan.pack
    rollout = _rollout(seed=5)
    with torch.no_grad():
        got, own, ref = (
            response_forward(m, rollout, temperature=1.0)["logprobs"]
            for m in (model, padded, exact)
        )
    within_torch_error(got, own, ref, name="log-probs")
    model.config.sliding_window = None  # the window matters on these rows
    with torch.no_grad():
        unwindowed = response_forward(model, rollout, temperature=1.0)["logprobs"]
    assert not torch.allclose(unwindowed, got, atol=1e-4)


class _ScaledLM(LlamaForCausalLM):
    """Logits scaled after the head (like a soft-capped model): padding-free must refuse it."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 2 * out.logits
        return out


def test_varlen_refused_where_it_differs_and_generate_untouched():
    torch.manual_seed(3)
    scaled = _ScaledLM(_config())
    with pytest.warns(UserWarning, match="padding_free.*stay padded"):
        plan = configure_module("policy", "lm", scaled, ComputeConfig())
    assert not plan.padding_free and plan.route(None) == "padded"
    model = LlamaForCausalLM(_config()).eval()
    before = model.config._attn_implementation
    configure_module("policy", "lm", model, ComputeConfig())
    with torch.no_grad():
        response_forward(model, _rollout(), temperature=1.0)
    assert model.config._attn_implementation == before  # switched only during the packed call
    assert plan_of(model).route(torch.tensor([0, 1, 2, 3])) == "varlen"  # no shared prompt


def test_ppo_module_padding_free_like_padded(tiny_tokenizer, tiny_config, monkeypatch, tmp_path):
    """Steps 1–3 of a k = 1 PPOModule (reward model, critic from it, reference) give the same
    statistics and rewards with `compute.padding_free` on (the varlen path runs) and off."""
    from rlhf_lightning.data.datamodule import RLHFDataModule
    from rlhf_lightning.data.sources import DataSource
    from rlhf_lightning.models.loading import ModelSpec
    from rlhf_lightning.models.reward_export import export_reward_model
    from rlhf_lightning.modules.ppo import PPOModule
    from rlhf_lightning.ppo import generation, logprobs
    from rlhf_lightning.ppo.config import CriticConfig, GenerationConfig, RewardConfig
    from rlhf_lightning.ppo.rollout import PromptBatch

    words = "great boring long fine awful".split()
    records = [{"prompt": f"the movie was {w} " + "and " * i} for i, w in enumerate(words)]
    dm = RLHFDataModule(
        tokenizer=tiny_tokenizer, prompts=DataSource(records=records, val_fraction=0), batch_size=5
    )
    dm.setup("fit")
    batch = next(iter(dm.dataloader("prompt", "train")))
    config = tiny_config(len(tiny_tokenizer))
    rm = AutoModelForSequenceClassification.from_config(LlamaConfig(**{**config, "num_labels": 1}))
    export_reward_model(rm, tiny_tokenizer, tmp_path / "rm")
    calls = []
    real = varlen.varlen_trunk
    monkeypatch.setattr(varlen, "varlen_trunk", lambda *a: calls.append(1) or real(*a))
    results = {}
    for padding_free in (True, False):
        torch.manual_seed(0)
        module = PPOModule(
            model_spec=ModelSpec(config=config),
            reward=RewardConfig(model=str(tmp_path / "rm"), normalize="none"),
            generation=GenerationConfig(max_new_tokens=6),
            critic=CriticConfig(kind="reward_model"),
            compute=ComputeConfig(padding_free=padding_free),
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
            raw = m.reward(rollout, [""] * len(rollout), torch.ones(len(rollout), dtype=bool))
            results[padding_free] = (logprobs.logprobs_values(m, rollout, gen, kl), raw)
        assert len(calls) == (4 if padding_free else 0)  # RM, reference, policy, critic
    (on, raw_on), (off, raw_off) = results[True], results[False]
    assert torch.allclose(raw_on, raw_off, atol=1e-5, rtol=1e-4)
    for field in ("logprobs", "ref_logprobs", "entropy", "values"):
        a, b = getattr(on, field), getattr(off, field)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), field  # two float32 routes


def test_gradient_checkpointed_models_stay_padded():
    """Recomputation in backward would run outside the packed call: such a model stays padded."""
    model = LlamaForCausalLM(_config()).train()
    model.gradient_checkpointing_enable()
    with pytest.warns(UserWarning, match="gradient checkpointing"):
        plan = configure_module("policy", "lm", model, ComputeConfig())
    assert not plan.padding_free and plan.route(None) == "padded"
    with pytest.raises(RuntimeError, match="gradient-checkpointed"):
        varlen.varlen_lm(model, _rollout())
