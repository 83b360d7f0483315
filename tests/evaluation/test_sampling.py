"""Seeded sampling (prompt-major rows, reproducible) and the sequence KL on the policy's own
samples, judged against a float64 recomputation."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_lightning.data.datamodule import RLHFDataModule
from rlhf_lightning.data.sources import DataSource
from rlhf_lightning.evaluation.sampling import generate_batch, sequence_logratio
from rlhf_lightning.models.loading import ModelSpec, load_causal_lm
from rlhf_lightning.models.masks import position_ids
from tests.evaluation.conftest import PROMPTS, tiny_policy_config

TEMPERATURE = 0.7


@pytest.fixture
def setup(tiny_tokenizer):
    dm = RLHFDataModule(
        tokenizer=tiny_tokenizer,
        prompts=DataSource(records=[{"prompt": p} for p in PROMPTS[:3]], val_fraction=0.0),
        batch_size=3,
    )
    batch = next(iter(dm.dataloader("prompt", "train", shuffle=False)))
    spec = ModelSpec(config=tiny_policy_config(len(tiny_tokenizer)))
    kwargs = {"vocab_size": len(tiny_tokenizer), "pad_token_id": tiny_tokenizer.pad_token_id}
    torch.manual_seed(1)
    policy = load_causal_lm(spec, **kwargs).eval()
    torch.manual_seed(2)
    reference = load_causal_lm(spec, **kwargs).eval()
    with torch.no_grad():  # sharper distributions than the init, so the KL is not ~0
        for model in (policy, reference):
            model.lm_head.weight.mul_(20.0)
    return tiny_tokenizer, batch, policy, reference


def _sample(tokenizer, batch, model, seed):
    return generate_batch(
        model, tokenizer, batch, per_prompt=2, max_new_tokens=6, temperature=TEMPERATURE, seed=seed
    )


def test_samples_are_prompt_major_and_seeded(setup):
    tokenizer, batch, policy, _ = setup
    samples = _sample(tokenizer, batch, policy, seed=4)
    assert len(samples.texts) == 6 and samples.per_prompt == 2
    assert torch.equal(samples.prompt_ids[0], batch["input_ids"][0])
    assert torch.equal(samples.prompt_ids[1], batch["input_ids"][0])  # rows 0, 1: prompt 0
    assert torch.equal(samples.prompt_ids[2], batch["input_ids"][1])
    assert samples.lengths == samples.response_mask.sum(1).tolist()
    again = _sample(tokenizer, batch, policy, seed=4)
    assert torch.equal(again.response_ids, samples.response_ids) and again.texts == samples.texts
    other = _sample(tokenizer, batch, policy, seed=5)
    assert not torch.equal(other.response_ids, samples.response_ids)


def _float64_logratio(policy, reference, samples) -> torch.Tensor:
    """Σ_t log π(y_t) − log π_ref(y_t), full forward and log_softmax in float64."""
    ids = torch.cat([samples.prompt_ids, samples.response_ids], dim=1)  # [N, P + R]
    attention = torch.cat([samples.prompt_mask, samples.response_mask], dim=1)
    steps = samples.response_ids.shape[1]
    total = 0
    for sign, model in ((1.0, policy), (-1.0, reference)):
        exact = copy.deepcopy(model).double()
        logits = exact(
            input_ids=ids, attention_mask=attention, position_ids=position_ids(attention)
        ).logits
        logp = torch.log_softmax(logits[:, -steps - 1 : -1] / TEMPERATURE, dim=-1)  # [N, R, V]
        token = logp.gather(-1, samples.response_ids[..., None])[..., 0]  # [N, R]
        total = total + sign * (token * samples.response_mask).sum(1)
    return total  # [N]


def _float32_logratio(policy, reference, samples) -> torch.Tensor:
    """The same in plain float32 torch (torch's own error on this input)."""
    ids = torch.cat([samples.prompt_ids, samples.response_ids], dim=1)
    attention = torch.cat([samples.prompt_mask, samples.response_mask], dim=1)
    steps = samples.response_ids.shape[1]
    total = 0
    with torch.no_grad():
        for sign, model in ((1.0, policy), (-1.0, reference)):
            logits = model(
                input_ids=ids, attention_mask=attention, position_ids=position_ids(attention)
            ).logits
            logp = torch.log_softmax(logits[:, -steps - 1 : -1] / TEMPERATURE, dim=-1)
            token = logp.gather(-1, samples.response_ids[..., None])[..., 0]
            total = total + sign * (token * samples.response_mask).sum(1)
    return total


def test_sequence_logratio_matches_float64(setup, within_torch_error):
    tokenizer, batch, policy, reference = setup
    samples = _sample(tokenizer, batch, policy, seed=4)
    ours = sequence_logratio(policy, reference, samples, temperature=TEMPERATURE, micro_batch=4)
    exact = _float64_logratio(policy, reference, samples)
    assert exact.abs().max() > 0.1  # two different models: a visible log-ratio
    within_torch_error(
        ours, _float32_logratio(policy, reference, samples), exact, name="logratio", atol=1e-6
    )
    same = sequence_logratio(reference, reference, samples, temperature=TEMPERATURE, micro_batch=4)
    assert torch.equal(same, torch.zeros(6))
