"""The quickstart runner: stage list, summary table, the overlay stage, a short prepare + SFT run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_lightning import cli
from rlhf_lightning.tasks import quickstart


def test_run_pipeline_and_table(tmp_path):
    calls = []
    stages = [
        quickstart.Stage("one", lambda ctx: calls.append("one") or {"x": 1.23456}),
        quickstart.Stage("two", lambda ctx: calls.append("two") or {"loss": 0.5, "log_dir": "d"}),
    ]
    ctx = quickstart.Context(out=tmp_path, configs=tmp_path)
    rows = quickstart.run_pipeline(ctx, stages)
    assert calls == ["one", "two"] and list(ctx.results) == ["one", "two"]
    table = quickstart.summary_table(rows)
    assert "x=1.235" in table and "loss=0.5" in table and "log_dir" not in table
    assert table.splitlines()[-1].startswith("total")
    with pytest.raises(FileNotFoundError, match="quickstart config not found"):
        ctx.config("missing.yaml")


def test_unknown_stage_is_rejected(tmp_path):
    with pytest.raises(SystemExit) as info:
        quickstart.main(["--out", str(tmp_path), "--stages", "nope"])
    assert info.value.code == 2


def test_short_prepare_and_sft_run(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = quickstart.main(
            [
                "--out",
                str(tmp_path),
                "--stages",
                "prepare,sft",
                "--override",
                "trainer.max_steps=4",
                "--override",
                "trainer.val_check_interval=4",
                "--override",
                "model.init_args.samples.every_n_steps=0",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    results = json.loads((tmp_path / "stages.json").read_text())
    assert results["sft"]["global_step"] == 4 and results["sft"]["sft/val/loss"] > 0
    assert (tmp_path / "export" / "sft" / "model.safetensors").is_file()
    assert list((tmp_path / "tb" / "sft").glob("events.out.tfevents.*"))
    assert "sft" in capsys.readouterr().out


def test_scoped_overrides_apply_to_their_stage_only(tmp_path):
    ctx = quickstart.Context(
        out=tmp_path, configs=tmp_path, overrides=["trainer.max_steps=3", "label:limit=8"]
    )
    assert ctx.stage_overrides("sft") == ["--trainer.max_steps=3"]
    assert ctx.stage_overrides("label", unscoped=False) == ["--limit=8"]
    assert ctx.stage_overrides("ppo") == ["--trainer.max_steps=3"]


def test_overopt_stage_applies_its_overlay_after_the_base(tmp_path, monkeypatch):
    """`--stages overopt` runs `rlhf fit --config ppo.yaml --config ppo_overopt.yaml` (in that
    order: the overlay's values win), into its own TensorBoard version and export folder."""
    seen = []
    trainer = SimpleNamespace(
        callback_metrics={"ppo/objective/kl": torch.tensor(1.5)}, global_step=3, log_dir="d"
    )
    monkeypatch.setattr(
        cli, "run_cli", lambda argv: seen.append(argv) or SimpleNamespace(trainer=trainer)
    )
    monkeypatch.setattr(quickstart, "_evaluate", lambda ctx, name: {"gold": 0.5, "distinct_2": 0.1})
    ctx = quickstart.Context(out=tmp_path, configs=quickstart.REPO_ROOT / "configs" / "quickstart")
    result = quickstart.overopt_stage(ctx)
    (argv,) = seen
    configs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--config"]
    assert [Path(c).name for c in configs] == ["ppo.yaml", "ppo_overopt.yaml"]
    assert "--trainer.logger.init_args.version=ppo_overopt" in argv
    assert f"--model.init_args.export_dir={tmp_path / 'export' / 'ppo_overopt'}" in argv
    assert result == {"ppo/objective/kl": 1.5, "global_step": 3, "gold": 0.5, "distinct_2": 0.1}


@pytest.mark.slow
def test_full_pipeline_writes_summary(tmp_path, capsys):
    """Every default stage, shortened: SFT → label → RM → PPO → gold evaluation → summary.json."""
    threads = torch.get_num_threads()
    shorten = [
        "sft:trainer.max_steps=30",
        "sft:trainer.val_check_interval=30",
        "sft:model.init_args.samples.every_n_steps=0",
        "label:limit=48",
        "reward:trainer.max_steps=6",
        "reward:trainer.val_check_interval=6",
        "ppo:trainer.limit_train_batches=2",
        "ppo:trainer.max_epochs=1",
    ]
    argv = ["--out", str(tmp_path)] + [a for item in shorten for a in ("--override", item)]
    try:
        assert quickstart.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {
        "sft_val_loss", "rm_val_accuracy", "gold_sft", "gold_ppo", "kl_final", "seconds",
        "kl_ppo_held_out", "win_rate_ppo", "gold_best_of_n", "kl_best_of_n",
        "ppo_minus_best_of_n", "ppo_vs_best_of_n",
    }  # fmt: skip
    assert list(summary["seconds"]) == [s.name for s in quickstart.STAGES]
    assert 0.0 <= summary["rm_val_accuracy"] <= 1.0 and summary["sft_val_loss"] > 0
    assert -4.0 <= summary["gold_sft"] <= 1.0 and -4.0 <= summary["gold_ppo"] <= 1.0
    assert isinstance(summary["kl_final"], float)  # the PPO tag that SUMMARY_KEYS names exists
    assert (tmp_path / "export" / "ppo" / "model.safetensors").is_file()
    assert "gold_ppo=" in capsys.readouterr().out
