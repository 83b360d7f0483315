"""`compute.compile`: torch.compile of the training / scoring forwards (`ppo.compile`).

The compiled forward + backward of a tiny policy must give the eager results (float32 rule of
tests/conftest.py: within twice eager float32's error against a float64 eager forward) over three
iterations of different prompt and response lengths, without a graph per length (dynamic shapes).
Compiling takes ~20–50 s on a 2-core CPU, so the test is marked slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_lightning.ppo.compile import compile_roles, compile_tags, configure_module, plan_of
from rlhf_lightning.ppo.config import ComputeConfig
from rlhf_lightning.ppo.logprobs import response_forward
from rlhf_lightning.ppo.rollout import Rollout

VOCAB = 61


def _rollout(prompt: int, steps: int, seed: int) -> Rollout:
    """3 rows: row 0 left-padded by 2, row 1 one response token short."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randint(3, VOCAB, (3, prompt), generator=gen)
    query_mask = torch.ones_like(query)
    query_mask[0, :2] = 0
    response = torch.randint(3, VOCAB, (3, steps), generator=gen)
    response_mask = torch.ones_like(response)
    response_mask[1, -1] = 0
    return Rollout(query, query_mask, response, response_mask, [""] * 3)


def _logprobs_and_grads(model, rollout):
    logp = response_forward(model, rollout, temperature=0.9)["logprobs"]  # [3, R]
    weights = torch.linspace(-1, 1, logp.numel()).reshape(logp.shape).to(logp.dtype)
    (logp * weights).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return logp.detach(), grads


@pytest.mark.slow
def test_compiled_policy_matches_eager_without_recompiling(within_torch_error):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    eager, exact = copy.deepcopy(model), copy.deepcopy(model).double()
    plan = configure_module("policy", "lm", model, ComputeConfig(compile=True, pack_groups=False))
    assert plan.call is not model and plan_of(eager).call is eager
    graphs = []
    for it, (prompt, steps) in enumerate([(7, 5), (9, 6), (5, 4)]):
        rollout = _rollout(prompt, steps, it)
        got, own, ref = (_logprobs_and_grads(m, rollout) for m in (model, eager, exact))
        within_torch_error(got[0], own[0], ref[0], name=f"log-probs, iteration {it}")
        within_torch_error(got[1], own[1], ref[1], name=f"gradients, iteration {it}")
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[-1] <= 2  # dynamic shapes: not a graph per length
    assert graphs[2] == graphs[1]  # a third length reuses the graphs
    tags = compile_tags()
    assert tags["ppo/perf/compile_s"] > 0 and tags["ppo/perf/compiled_graphs"] == graphs[-1]


def test_compile_roles():
    assert compile_roles(ComputeConfig()) == set()
    assert compile_roles(ComputeConfig(compile=True)) == {"policy", "reference", "critic", "reward"}
    assert compile_roles(ComputeConfig(compile=["policy", "critic"])) == {"policy", "critic"}
    with pytest.raises(ValueError, match=r"model\.compute\.compile: unknown role\(s\) actor"):
        compile_roles(ComputeConfig(compile=["actor"]))
