"""How each model's forward runs in steps 2, 3 and 5: compiled or eager, group-packed or padded.

`configure_forwards(models, cfg)` (called once by `PPOModule.configure_model`) records a
`ForwardPlan` for every model of the `PPOModels` bundle — policy, reference, critic, reward model
— and for their trunks; `logprobs`, `scoring` and `update` ask `plan_of(module)` which callable to
run and whether to pack groups (`ppo.packing`). The models themselves are not changed (no
wrapper in the module tree, state dicts and checkpoints as without compile); `generate` always
runs eager (its KV-cached decode steps would recompile for every cache length).

`compute.compile` (true, or a list of roles) compiles the chosen models' repeated transformer
blocks with `torch.compile` (`CompiledBlocks`: regional compilation, inductor on CPU and CUDA
alike), by default with `dynamic=True` so that new prompt / response lengths reuse the graph
instead of recompiling. Graphs: one per block class and mode — inference (`no_grad`) and training
(autograd) are separate — plus one more where a micro-batch of one row specialises the batch
size; every layer of every role with the same block class shares them. Past torch's
`recompile_limit` (8 per code object) dynamo runs the block eagerly, so watch the graph count. `compile_tags()` reports the time spent compiling and the
number of graphs as `ppo/perf/compile_s` and `ppo/perf/compiled_graphs`, so steady-state
iteration times can be read apart from it.

References: PyTorch `torch.compile` (dynamic shapes, `torch._dynamo.utils.counters`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from rlhf_lightning.models.reward_export import backbone_and_head
from rlhf_lightning.ppo import packing, varlen
from rlhf_lightning.ppo.config import COMPILE_ROLES, ComputeConfig

if TYPE_CHECKING:
    from rlhf_lightning.ppo.models import PPOModels

__all__ = [
    "ForwardPlan",
    "CompiledBlocks",
    "repeated_blocks",
    "plan_of",
    "configure_module",
    "configure_forwards",
    "compile_roles",
    "compile_tags",
]


@dataclass(frozen=True)
class ForwardPlan:
    """How one module's forwards run."""

    call: Callable
    """What to call: the module, or it with its blocks compiled (`CompiledBlocks`; same
    parameters)."""
    trunk_call: Callable | None = None
    """The (compiled) trunk of a causal LM / critic / classifier, for packed forwards."""
    pack: bool = False
    """Pack groups (`ppo.packing`); on only where `packing_matches` held for this module."""
    padding_free: bool = False
    """Run rows padding-free (`ppo.varlen`) where they are not group-packed; on only where
    `packing_matches(..., varlen=True)` held for this module."""

    def packs(self, group: torch.Tensor | None) -> bool:
        """Whether a batch with these groups runs packed (some rows share a prompt)."""
        return self.pack and packing.shares_prefixes(group)

    def route(self, group: torch.Tensor | None) -> str:
        """How a batch with these groups runs: `groups` (packed), `varlen` or `padded`."""
        if self.packs(group):
            return "groups"
        return "varlen" if self.padding_free else "padded"


_PLANS: weakref.WeakKeyDictionary[nn.Module, ForwardPlan] = weakref.WeakKeyDictionary()


def plan_of(module: nn.Module) -> ForwardPlan:
    """The recorded plan of `module`, or eager and padded."""
    plan = _PLANS.get(module)
    return plan if plan is not None else ForwardPlan(module)


def compile_roles(cfg: ComputeConfig) -> set[str]:
    """The roles `compute.compile` names (true = all); ValueError (one line) for an unknown one."""
    if isinstance(cfg.compile, bool):
        return set(COMPILE_ROLES) if cfg.compile else set()
    roles = {str(role) for role in cfg.compile}
    unknown = sorted(roles - set(COMPILE_ROLES))
    if unknown:
        raise ValueError(
            f"model.compute.compile: unknown role(s) {', '.join(unknown)}; "
            f"use true/false or a list of {', '.join(COMPILE_ROLES)}"
        )
    return roles


_BLOCK_CALLS: weakref.WeakKeyDictionary[nn.Module, object] = weakref.WeakKeyDictionary()


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of `module`: submodules whose class is named in a Hugging Face
    model's `_no_split_modules` (e.g. `LlamaDecoderLayer`); empty when there is none."""
    names = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    return [sub for sub in module.modules() if type(sub).__name__ in names]


class CompiledBlocks:
    """Calls `module` with its repeated blocks compiled (regional compilation: one block is traced
    and its graph serves every layer, so a 30-layer model compiles in the time of one layer —
    34 s instead of 234 s for SmolLM2-135M's forward + backward on 2 CPU cores — at the same
    steady-state speed). The compiled blocks are switched in only during the call, so `generate`
    and any other use of the module stay eager."""

    def __init__(self, module: nn.Module, blocks: list[nn.Module], cfg: ComputeConfig):
        self.module, self.blocks = module, blocks
        kwargs = {"dynamic": cfg.compile_dynamic}
        if cfg.compile_mode:
            kwargs["mode"] = cfg.compile_mode
        for block in blocks:  # shared by every plan that runs this block
            if block not in _BLOCK_CALLS:
                _BLOCK_CALLS[block] = torch.compile(block._call_impl, **kwargs)

    @contextlib.contextmanager
    def active(self):
        """Route the blocks' calls through their compiled code inside the context."""
        saved = [block._compiled_call_impl for block in self.blocks]
        for block in self.blocks:
            block._compiled_call_impl = _BLOCK_CALLS[block]
        try:
            yield
        finally:
            for block, previous in zip(self.blocks, saved):
                block._compiled_call_impl = previous

    def __call__(self, *args, **kwargs):
        with self.active():
            return self.module(*args, **kwargs)


def _compiled(module: nn.Module, cfg: ComputeConfig):
    """`module` with its blocks compiled, or all of it (`torch.compile`) when it has no blocks."""
    blocks = repeated_blocks(module)
    if blocks:
        return CompiledBlocks(module, blocks, cfg)
    kwargs = {"dynamic": cfg.compile_dynamic}
    if cfg.compile_mode:
        kwargs["mode"] = cfg.compile_mode
    return torch.compile(module, **kwargs)


def _trunk(kind: str, module: nn.Module) -> nn.Module:
    if kind == "lm":
        return packing.lm_trunk_and_head(module)[0]
    if kind == "critic":
        return module.trunk
    return backbone_and_head(module)[0]


def configure_module(role: str, kind: str, module: nn.Module, cfg: ComputeConfig) -> ForwardPlan:
    """Record the plan of one model and of its trunk: `kind` is `lm` (causal LM), `critic`
    (`CriticModel`) or `classifier` (reward model); `role` names it for `compute.compile`."""
    use_compile = role in compile_roles(cfg)
    trunk = _trunk(kind, module)
    trunk_call = _compiled(trunk, cfg) if use_compile else trunk
    pack = cfg.pack_groups and packing.packing_matches(kind, module)
    if cfg.pack_groups and not pack:
        rank_zero_warn(
            f"model.compute.pack_groups: the {role} model does not give packed == padded results "
            "(attention implementation or LM head); its forwards stay padded"
        )
    checkpointed = varlen.gradient_checkpointing(module)
    if cfg.padding_free and checkpointed:
        rank_zero_warn(
            f"model.compute.padding_free: off for the {role} model — gradient checkpointing "
            "recomputes its forward outside the padding-free call; its forwards stay padded"
        )
    padding_free = (
        cfg.padding_free and not checkpointed and packing.packing_matches(kind, module, varlen=True)
    )
    if cfg.padding_free and not checkpointed and not padding_free:
        rank_zero_warn(
            f"model.compute.padding_free: the {role} model does not give padding-free == padded "
            "results (attention implementation or LM head); its forwards stay padded"
        )
    call = _compiled(module, cfg) if use_compile else module
    _PLANS[module] = plan = ForwardPlan(call, trunk_call, pack, padding_free)
    _PLANS[trunk] = ForwardPlan(trunk_call)
    return plan


def configure_forwards(models: PPOModels, cfg: ComputeConfig, samples_per_prompt: int) -> None:
    """Record the plans of every model in `models` (packing is checked only for k > 1)."""
    if samples_per_prompt == 1:
        cfg = replace(cfg, pack_groups=False)
    configure_module("policy", "lm", models.policy, cfg)
    if models.reference is not None:
        configure_module("reference", "lm", models.reference, cfg)
    if models.critic is not None:
        configure_module("critic", "critic", models.critic, cfg)
    reward_model = getattr(models.reward, "model", None)
    if reward_model is not None:
        configure_module("reward", "classifier", reward_model, cfg)


def compile_tags() -> dict[str, float]:
    """`ppo/perf/compile_s` (wall seconds this process spent compiling so far, forward and
    backward graphs) and `ppo/perf/compiled_graphs` (graphs built so far; more than the roles ×
    modes means recompiles); empty before anything was compiled."""
    from torch._dynamo.utils import calculate_time_spent, counters

    graphs = counters["stats"].get("unique_graphs", 0)
    if not graphs:
        return {}
    seconds = calculate_time_spent().get("total_wall_time", 0.0)  # backward graphs included
    return {"ppo/perf/compile_s": float(seconds), "ppo/perf/compiled_graphs": float(graphs)}
