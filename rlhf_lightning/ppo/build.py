"""Build the PPO models bundle once, one function per model role (`PPOModule.configure_model`).

Order (it fixes the random draws of fresh-config models and new heads): policy → reference →
reward (RM export + vocabulary check, or a callable) → gold → critic / value head.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from rlhf_lightning.data.templates import response_separator
from rlhf_lightning.models.heads import ValueHead
from rlhf_lightning.models.loading import ModelSpec, is_peft, load_causal_lm
from rlhf_lightning.models.reward_export import load_reward_model
from rlhf_lightning.ppo import models as ppo_models
from rlhf_lightning.ppo.config import CriticConfig, GenerationConfig, RewardConfig
from rlhf_lightning.ppo.generation import hf_generation_config
from rlhf_lightning.ppo.models import PPOModels, Vocab
from rlhf_lightning.ppo.scoring import RewardFunction, RewardModelScorer
from rlhf_lightning.ppo.state import same_vocabulary
from rlhf_lightning.scorers import BatchScorer, load_scorer

__all__ = [
    "ModelSpecs",
    "build_vocab",
    "build_policy",
    "build_reference",
    "build_reward",
    "build_gold",
    "build_values",
    "build_models",
]


@dataclass(frozen=True)
class ModelSpecs:
    """The model specs and config groups the bundle is built from."""

    model_spec: ModelSpec
    """The policy."""
    reference_spec: ModelSpec | None
    """An explicit reference; None = a frozen copy of the policy (or LoRA adapters disabled)."""
    reward: RewardConfig
    """Reward source and gold labeler."""
    generation: GenerationConfig
    """Sampling settings (for the HF generation config)."""
    critic: CriticConfig
    """Value model choice; `kind` resolved (`ppo.config.resolve_critic_kind`, never `auto`)."""


def build_vocab(tokenizer, generation: GenerationConfig) -> Vocab:
    """EOS / pad ids, separator and HF generation config of the policy tokenizer."""
    return Vocab(
        tokenizer,
        (tokenizer.eos_token_id,),
        tokenizer.pad_token_id,
        response_separator(tokenizer),
        hf_generation_config(generation, tokenizer),
    )


def build_policy(spec: ModelSpec, tokenizer) -> nn.Module:
    """The trainable policy, dropout off, in train mode (steps 1–3 switch it to eval)."""
    policy = load_causal_lm(spec, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    # from_pretrained returns eval mode; every model stays in train mode with dropout off
    # (training_step switches to eval around rollouts), so Lightning sees one mode
    return ppo_models.disable_dropout(policy).train()


def build_reference(spec: ModelSpec | None, policy: nn.Module, tokenizer) -> nn.Module | None:
    """A frozen reference: `spec`'s model, a copy of the policy, or None for a LoRA policy."""
    if spec is not None:
        ref = load_causal_lm(spec, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        return ppo_models.frozen_copy(ppo_models.disable_dropout(ref))
    if not is_peft(policy):
        return ppo_models.frozen_copy(policy)
    return None


def build_reward(cfg: RewardConfig, vocab: Vocab) -> RewardModelScorer | RewardFunction:
    """The reward scorer: an RM export (train mode, dropout off) or a `module:function`."""
    if cfg.model is None:
        return RewardFunction(
            load_scorer(
                cfg.function, "model.reward.function", cfg.function_kwargs, cfg.function_batched
            )
        )
    rm, rm_tok, stats = load_reward_model(cfg.model)
    # train mode like the rest of the module (Lightning warns otherwise); dropout is off
    # and training_step switches the frozen models to eval before using them
    rm = ppo_models.disable_dropout(rm).train()
    own_tokenizer = None if same_vocabulary(vocab.tokenizer, rm_tok) else rm_tok
    if cfg.normalize == "stats" and not stats:
        rank_zero_warn(f"model.reward.model: {cfg.model} has no reward_stats.json; raw rewards")
    return RewardModelScorer(rm, stats, own_tokenizer, vocab, cfg.micro_batch_size)


def build_gold(cfg: RewardConfig) -> BatchScorer | None:
    """The optional gold labeler."""
    if cfg.gold is None:
        return None
    return load_scorer(cfg.gold, "model.reward.gold", cfg.gold_kwargs)


def build_values(
    cfg: CriticConfig, reward_cfg: RewardConfig, reward, policy: nn.Module
) -> tuple[ppo_models.CriticModel | None, ValueHead | None]:
    """(critic, value head): at most one is built (`critic.kind`, resolved); `none` builds neither
    (critic-free estimators: no value weights in memory or checkpoints)."""
    kind = cfg.kind
    if kind == "none":
        return None, None
    if kind == "auto":
        kind = "reward_model" if reward_cfg.model is not None else "policy_copy"
    if kind == "reward_model":
        stats = reward.stats if reward_cfg.normalize == "stats" else None
        return ppo_models.critic_from_reward_model(reward.model, stats), None
    if kind == "policy_copy":
        return ppo_models.critic_from_policy(policy), None
    return None, ValueHead(policy.config.hidden_size)


def build_models(specs: ModelSpecs, tokenizer) -> PPOModels:
    """Every model of the stage, in the order of the module docstring."""
    vocab = build_vocab(tokenizer, specs.generation)
    policy = build_policy(specs.model_spec, tokenizer)
    reference = build_reference(specs.reference_spec, policy, tokenizer)
    reward = build_reward(specs.reward, vocab)
    gold = build_gold(specs.reward)
    critic, value_head = build_values(specs.critic, specs.reward, reward, policy)
    return PPOModels(policy, reference, critic, value_head, reward, gold, vocab)
