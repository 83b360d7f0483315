"""The quickstart runner: stage list, summary table, and a shortened prepare + SFT run."""

from __future__ import annotations

import json

import pytest
import torch

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
                "model.init_args.sample_every_n_steps=0",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    results = json.loads((tmp_path / "stages.json").read_text())
    assert results["sft"]["global_step"] == 4 and results["sft"]["val/loss"] > 0
    assert (tmp_path / "export" / "sft" / "model.safetensors").is_file()
    assert list((tmp_path / "tb" / "sft").glob("events.out.tfevents.*"))
    assert "sft" in capsys.readouterr().out
