"""Warmup + cosine schedule, decay groups, markdown sample tables."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.modules.common import (
    OptimConfig,
    build_optimizer,
    log_text_table,
    lr_factor,
    markdown_table,
)


def test_schedule_shape():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, weight_decay=0.1)
    optimizer, schedule = build_optimizer(model.named_parameters(), cfg, total_steps=14)
    lrs = []
    for _ in range(16):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0)
    mid = 4 + 5  # halfway through the 10 decay steps: cos(pi/2) = 0
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    decays = [g["weight_decay"] for g in optimizer.param_groups]
    sizes = [sum(p.numel() for p in g["params"]) for g in optimizer.param_groups]
    assert decays == [0.1, 0.0] and sizes == [16, 4 + 4 + 4]


def test_lr_factor_and_total_steps_errors():
    assert lr_factor(0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == 1.0
    assert lr_factor(10, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == pytest.approx(0.0)
    assert lr_factor(5, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.5))
    )
    with pytest.raises(ValueError, match="total_steps"):
        build_optimizer([torch.nn.Parameter(torch.ones(2))], OptimConfig(), float("inf"))
    opt, _ = build_optimizer([torch.nn.Parameter(torch.ones(2))], OptimConfig(total_steps=3))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


class _FakeExperiment:
    def __init__(self):
        self.calls = []

    def add_text(self, tag, text, global_step):
        self.calls.append((tag, text, global_step))


class _FakeLogger:
    def __init__(self):
        self.experiment = _FakeExperiment()


def test_markdown_table_and_logging():
    rows = [{"prompt": "a | b", "response": "line1\nline2", "score": 0.123456}]
    text = markdown_table(rows)
    assert text.splitlines() == [
        "| prompt | response | score |",
        "|---|---|---|",
        "| a \\| b | line1 line2 | 0.1235 |",
    ]
    logger = _FakeLogger()
    assert log_text_table([logger, object()], "sft/samples", rows, step=7)
    assert logger.experiment.calls == [("sft/samples", text, 7)]
    assert not log_text_table(None, "x", rows, 0)


def test_fused_adamw_matches_the_reference_update():
    """build_optimizer picks torch's fused AdamW and it follows the per-tensor update rule."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
    twin.load_state_dict(model.state_dict())
    start = model[0].weight.detach().clone()
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, total_steps=10)
    fused, _ = build_optimizer(model.parameters(), cfg)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW(
        [
            {"params": [twin[0].weight], "weight_decay": 0.1},
            {"params": [twin[0].bias, twin[1].weight, twin[1].bias], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        foreach=False,
    )
    for _ in range(3):
        x = torch.randn(4, 8)
        for net, opt in ((model, fused), (twin, plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert (model[0].weight - start).abs().max() > 1e-3  # the steps did move the weights


def test_fused_allowed_only_for_plain_precision_plugins():
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import (
        DoublePrecision,
        FSDPPrecision,
        HalfPrecision,
        MixedPrecision,
        Precision,
    )

    from rlhf_lightning.modules.common import fused_allowed

    def trainer(plugin):
        return SimpleNamespace(precision_plugin=plugin)

    assert fused_allowed(None)  # no trainer (scripts, tests)
    for ok in (
        Precision(),
        HalfPrecision("bf16-true"),
        HalfPrecision("16-true"),
        DoublePrecision(),
    ):
        assert fused_allowed(trainer(ok)), ok
    # mixed precision refuses to clip fused optimizers; FSDP's sharded scaler would skip its
    # cross-rank overflow check
    for bad in (MixedPrecision("bf16-mixed", "cpu"), FSDPPrecision("32-true")):
        assert not fused_allowed(trainer(bad)), bad
