"""Helpers shared by the Lightning modules: optimizer + schedule, TensorBoard text tables.

The schedule is linear warmup followed by cosine decay to `min_lr_ratio * lr`
(Loshchilov & Hutter 2017, "SGDR"; the warmup + cosine shape used by most LM
fine-tuning recipes). Weight decay applies to matrices only (biases and norm
gains are not decayed), as in AdamW practice (Loshchilov & Hutter 2019). AdamW uses torch's
fused kernel whenever every parameter allows it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 1e-4
    """Peak learning rate (reached at the end of warmup)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to weight matrices only."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from ~0 to `lr`."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` at the end of the cosine decay."""
    total_steps: int | None = None
    """Optimizer steps of the whole schedule; null = the trainer's estimated stepping batches."""


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(params: Iterable, weight_decay: float) -> list[dict]:
    """Split trainable parameters into decayed (ndim ≥ 2) and non-decayed groups.

    `params` may hold tensors or `(name, tensor)` pairs.
    """
    decay, no_decay = [], []
    for item in params:
        param = item[1] if isinstance(item, tuple) else item
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def fused_supported(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW kernel takes every parameter (floating point, on CPU or CUDA).

    Measured on 2 CPU cores for a 135M-parameter model: 0.06 s per step fused vs 0.63 s for the
    default per-tensor loop; the update rule is the same.
    """
    tensors = [p for g in groups for p in g["params"]]
    return bool(tensors) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors
    )


def fused_allowed(trainer) -> bool:
    """Whether the trainer's precision plugin is one where fused AdamW is known to be safe: plain
    `32-true`, `16-true`/`bf16-true` or `64-true`. Lightning's mixed-precision plugin refuses to
    clip the gradients of a fused optimizer, and with FSDP's sharded gradient scaler a fused step
    would skip the cross-rank overflow check; other plugins keep the per-tensor AdamW."""
    from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, Precision

    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    return plugin is None or type(plugin) in (Precision, HalfPrecision, DoublePrecision)


def build_optimizer(
    params: Iterable, cfg: OptimConfig, total_steps: int | None = None, allow_fused: bool = True
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW over `params` and its warmup + cosine `LambdaLR` (step it once per optimizer step).

    `total_steps` (e.g. `trainer.estimated_stepping_batches`) is used when `cfg.total_steps` is null.
    The fused kernel is used when `allow_fused` (see `fused_allowed`) and every parameter allows it.
    """
    steps = cfg.total_steps if cfg.total_steps is not None else total_steps
    if steps is None or not math.isfinite(steps) or steps <= 0:
        raise ValueError(
            "optim field 'total_steps': cannot infer the schedule length; set trainer.max_steps "
            "or optim.total_steps"
        )
    groups = param_groups(params, cfg.weight_decay)
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=allow_fused and fused_supported(groups),
    )
    schedule = LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step,
            warmup_steps=cfg.warmup_steps,
            total_steps=int(steps),
            min_lr_ratio=cfg.min_lr_ratio,
        ),
    )
    return optimizer, schedule


def lightning_optimizers(params: Iterable, cfg: OptimConfig, trainer) -> dict:
    """`configure_optimizers` return value: optimizer + per-step scheduler."""
    total = trainer.estimated_stepping_batches if trainer is not None else None
    optimizer, schedule = build_optimizer(params, cfg, total, fused_allowed(trainer))
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1},
    }


def _cell(value) -> str:
    """A markdown table cell: one line, pipes escaped."""
    if isinstance(value, float):
        value = f"{value:.4g}"
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return " ".join(text.split()) or " "


def markdown_table(rows: list[dict]) -> str:
    """Rows of dicts (same keys, first row's order) → a markdown table string."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def log_text_table(logger, tag: str, rows: list[dict], step: int) -> bool:
    """Write `rows` as a markdown table to TensorBoard under `tag` at `step`.

    Accepts a single logger or a list of loggers; those without `add_text`
    (non-TensorBoard) are skipped. Returns True when something was written.
    """
    loggers = logger if isinstance(logger, list | tuple) else [logger]
    text = markdown_table(rows)
    wrote = False
    for item in loggers:
        experiment = getattr(item, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text(tag, text, global_step=step)
            wrote = True
    return wrote
