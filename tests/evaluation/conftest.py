"""Tiny models for `rlhf evaluate` tests: two random policies, a random reward-model export, a
handful of prompts and a config writer (gold judge: `rlhf_lightning.labeling:length_score`)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_lightning.models.loading import ModelSpec, load_sequence_classifier
from rlhf_lightning.models.reward_export import export_reward_model

PROMPTS = [f"write a short review of the film {c} ?" for c in "abcde"]


def tiny_policy_config(vocab_size: int) -> dict:
    """A ~20k-parameter Llama (1 layer) for `ModelSpec(config=...)`."""
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
    }


def _save_policy(path, tokenizer, config: dict, seed: int):
    torch.manual_seed(seed)
    cfg = {k: v for k, v in config.items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**cfg, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def eval_assets(tmp_path_factory, tiny_tokenizer):
    """Folders: policies `a` and `b` (different random weights), a reward export, prompts."""
    root = tmp_path_factory.mktemp("evaluation")
    config = tiny_policy_config(len(tiny_tokenizer))
    _save_policy(root / "a", tiny_tokenizer, config, seed=1)
    _save_policy(root / "b", tiny_tokenizer, config, seed=2)
    torch.manual_seed(3)
    rm = load_sequence_classifier(ModelSpec(config=config)).eval()
    export_reward_model(rm, tiny_tokenizer, root / "rm", {"mean": 0.0, "std": 1.0})
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return root


def eval_config(assets, out_dir, **changes) -> dict:
    """A small `rlhf evaluate` config: a, b and best-of-{1,2,4} of a; baseline a."""
    config = {
        "policies": [
            {"name": "a", "model": {"name_or_path": str(assets / "a")}},
            {"name": "b", "model": {"name_or_path": str(assets / "b")}},
            {"name": "bon", "best_of_n": {"base": "a", "n": [1, 2, 4]}},
        ],
        "prompts": {"path": str(assets / "prompts.jsonl")},
        "proxy": {"reward_model": str(assets / "rm")},
        "gold": {"function": "rlhf_lightning.labeling:length_score"},
        "baseline": "a",
        "out_dir": str(out_dir),
        "sampling": {"max_new_tokens": 6, "samples_per_prompt": 2, "batch_size": 3, "seed": 5},
        "bootstrap_resamples": 200,
        "side_by_side": 3,
    }
    config.update(changes)
    return config


@pytest.fixture
def write_config(tmp_path, eval_assets):
    """`write_config(name, **changes)` → path of a YAML config whose report goes to tmp/name."""

    def write(name: str, **changes) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(eval_config(eval_assets, tmp_path / name, **changes)))
        return str(path)

    return write
