"""The models of the PPO stage: the `PPOModels` bundle, critic, frozen reference, dropout control.

- `PPOModels` (built once by `ppo.build.build_models`): policy, reference (None = the LoRA policy
  with adapters disabled), critic or shared value head (both None is the slot for critic-free
  estimators), reward scorer, optional gold labeler, and `Vocab` (tokenizer, EOS ids, pad id,
  prompt/response separator, the HF generation config). Steps 1–5 read their models from it.

- Critic (`CriticModel`): a transformer trunk plus a scalar head giving one value per position.
  Default initialisation is from the reward model (Ouyang et al. 2022 initialise the value function
  from the RM); the head is rescaled by the RM's reward statistics so that initial values are on
  the same (normalised) scale as the rewards PPO trains on. Alternatives: a copy of the policy
  trunk with a fresh head, or a value head on the policy trunk itself (`ValueHead`, shared).
- Reference: a frozen deep copy of the initial policy, or — for a LoRA policy — the same module
  with its adapters disabled (no second copy of the base weights).
- Dropout is switched off in every model: PPO's ratio π/π_old must be exactly 1 before the first
  step, which a stochastic forward would break.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import GenerationConfig as HFGenerationConfig

from rlhf_lightning.models.heads import scalar_head, trunk_hidden
from rlhf_lightning.models.loading import is_peft, unwrap_peft
from rlhf_lightning.models.reward_export import backbone_and_head, reward_scale

if TYPE_CHECKING:
    from rlhf_lightning.models.heads import ValueHead
    from rlhf_lightning.ppo.scoring import RewardScorer
    from rlhf_lightning.scorers import BatchScorer

__all__ = [
    "Vocab",
    "PPOModels",
    "CriticModel",
    "critic_from_reward_model",
    "critic_from_policy",
    "frozen_copy",
    "reference_context",
    "disable_dropout",
]


@dataclass(frozen=True)
class Vocab:
    """The policy's tokenizer and the token conventions derived from it."""

    tokenizer: object
    """The policy tokenizer (decodes responses, renders texts for a different-vocabulary RM)."""
    eos_ids: tuple[int, ...]
    """Token ids that end a response."""
    pad_id: int
    """Padding id of responses."""
    response_separator: str
    """Text between a rendered prompt and its response (`data.templates.response_separator`)."""
    hf_generation: HFGenerationConfig
    """Sampling config for `generate` (`generation.hf_generation_config`)."""


@dataclass(frozen=True)
class PPOModels:
    """Every model a PPO iteration uses, built once (`ppo.build.build_models`)."""

    policy: nn.Module
    """The policy being trained (LoRA allowed)."""
    reference: nn.Module | None
    """Frozen reference; None = the LoRA policy with its adapters disabled."""
    critic: CriticModel | None
    """Separate value model; None with a shared `value_head`."""
    value_head: ValueHead | None
    """Value head on the policy's last hidden state; None with a separate `critic`."""
    reward: RewardScorer
    """Raw sequence reward of a rollout (`ppo.scoring`)."""
    gold: BatchScorer | None
    """Optional gold labeler (logged and monitored, never trained on)."""
    vocab: Vocab
    """Tokenizer and token conventions."""

    def reference_model(self) -> contextlib.AbstractContextManager[nn.Module]:
        """Context yielding the module that computes reference log-probs."""
        return reference_context(self.policy, self.reference)

    @contextlib.contextmanager
    def sampling_mode(self) -> Iterator[None]:
        """Policy, critic and value head in eval mode for steps 1–3; their modes restored after."""
        models = [m for m in (self.policy, self.critic, self.value_head) if m is not None]
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)


class CriticModel(nn.Module):
    """Transformer trunk (returns `last_hidden_state`) + linear head → Float[B, T] values."""

    def __init__(self, trunk: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids/attention_mask Long[B, T] → values Float[B, T] (positions from the mask,
        as in `models.heads.trunk_hidden`)."""
        hidden = trunk_hidden(self.trunk, input_ids, attention_mask)  # [B, T, H]
        return scalar_head(self.head, hidden)  # [B, T]


def _normalised_head(head: nn.Module, stats: dict | None) -> nn.Linear:
    """Copy of a `Linear(H, 1)` head computing (score − mean) / std, with a bias term."""
    weight = head.weight.detach()  # [1, H]
    bias = head.bias.detach() if getattr(head, "bias", None) is not None else None
    out = nn.Linear(weight.shape[1], 1, bias=True, dtype=weight.dtype, device=weight.device)
    mean, std = reward_scale(stats)
    with torch.no_grad():
        out.weight.copy_(weight / std)
        out.bias.fill_(-mean / std)
        if bias is not None:
            out.bias.add_(bias.reshape(()) / std)
    return out


def critic_from_reward_model(reward_model: nn.Module, stats: dict | None) -> CriticModel:
    """Trainable critic initialised from an RM export (`AutoModelForSequenceClassification`)."""
    trunk, head = backbone_and_head(reward_model)
    critic = CriticModel(copy.deepcopy(trunk), _normalised_head(head, stats))
    return critic.requires_grad_(True)


def critic_from_policy(policy: nn.Module) -> CriticModel:
    """Trainable critic = copy of the policy's trunk + zero-initialised head."""
    inner = unwrap_peft(policy, merge=False)
    trunk = copy.deepcopy(inner.base_model)
    hidden = inner.config.hidden_size
    dtype = next(trunk.parameters()).dtype
    head = nn.Linear(hidden, 1, bias=True, dtype=dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return CriticModel(trunk, head).requires_grad_(True)


def frozen_copy(model: nn.Module) -> nn.Module:
    """Deep copy with gradients off (callers put it in eval mode while using it)."""
    return copy.deepcopy(model).requires_grad_(False)


@contextlib.contextmanager
def reference_context(policy: nn.Module, reference: nn.Module | None):
    """Yield the module that computes reference log-probs.

    With a separate `reference` model, that model; otherwise the LoRA `policy` with its adapters
    disabled (its base weights are the reference).
    """
    if reference is not None:
        yield reference
        return
    if not is_peft(policy):
        raise RuntimeError("no reference model: a separate copy is needed for a non-LoRA policy")
    with policy.disable_adapter():
        yield policy


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set p = 0 on every dropout layer and every `*dropout*` float in configs (in place)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for key, value in config.to_dict().items():
                if "dropout" in key and isinstance(value, float) and value > 0:
                    setattr(config, key, 0.0)
    for name, value in list(vars(model).items()):
        if "dropout" in name and isinstance(value, float):
            setattr(model, name, 0.0)
    for module in model.modules():
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model
