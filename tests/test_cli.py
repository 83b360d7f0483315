"""The `rlhf` CLI: fit a few SFT steps, TensorBoard read-back, export, validate, errors, dispatch."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_lightning import cli
from rlhf_lightning.modules.sft import SFTSampleConfig
from rlhf_lightning.tasks.sentiment import prepare

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "sft.yaml")


def _overrides(out: Path, version: str = "sft") -> list[str]:
    return [
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.version={version}",
        "--trainer.max_steps=16",
        "--trainer.val_check_interval=8",
        "--trainer.log_every_n_steps=1",
        "--model.init_args.optim.warmup_steps=2",
        "--model.init_args.optim.lr=0.01",
        "--model.init_args.samples.every_n_steps=8",
        "--model.init_args.samples.num=2",
        "--model.init_args.samples.max_new_tokens=8",
        f"--model.init_args.export_dir={out / 'export'}",
        f"--data.tokenizer={out / 'tokenizer'}",
        f"--data.demonstrations.path={out / 'data' / 'sft_train.jsonl'}",
        f"--data.demonstrations.val_path={out / 'data' / 'sft_val.jsonl'}",
        "--data.batch_size=16",
    ]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """One short `rlhf fit` on the embedded task, shared by the tests below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: per-op overhead dominates, one thread is fastest
    out = tmp_path_factory.mktemp("cli_sft")
    prepare(out, num_train=96, num_val=16, num_prompts=4)
    try:
        run = cli.run_cli(["fit", "--config", CONFIG, *_overrides(out)])
    finally:
        torch.set_num_threads(threads)
    return out, run


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_fit_writes_tensorboard_with_falling_loss(sft_run):
    out, _ = sft_run
    acc = EventAccumulator(str(out / "tb" / "sft"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "sft/train/loss",
        "sft/train/lr",
        "sft/val/loss",
        "sft/val/ppl",
        "sft/perf/tokens_per_s",
    } <= tags
    loss = [v for _, v in _scalars(acc, "sft/train/loss")]
    assert len(loss) == 16
    first, last = sum(loss[:3]) / 3, sum(loss[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    val = _scalars(acc, "sft/val/loss")
    assert [s for s, _ in val] == [7, 15] and val[1][1] < val[0][1]
    texts = acc.Tensors("sft/samples/text_summary")
    assert [e.step for e in texts] == [0, 8, 16]
    table = texts[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| prompt | generated | reference |")
    assert len(table.splitlines()) == 2 + 2  # header, rule, num_samples rows
    assert (out / "tb" / "sft" / "config.yaml").is_file()
    assert (out / "tb" / "sft" / "checkpoints" / "last.ckpt").is_file()


def test_export_reloads_with_identical_logits(sft_run):
    out, run = sft_run
    tok = AutoTokenizer.from_pretrained(out / "export")
    model = AutoModelForCausalLM.from_pretrained(out / "export").eval()
    ids = tok(["write a review of the silent river . the acting was good ."], return_tensors="pt")
    live = run.model.model.eval()
    with torch.no_grad():
        expected = live(**ids).logits  # [1, T, V]
        torch.testing.assert_close(model(**ids).logits, expected, rtol=0, atol=0)
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_validate_from_checkpoint_matches_fit(sft_run):
    out, run = sft_run
    fit_val = float(run.trainer.callback_metrics["sft/val/loss"])
    ckpt = out / "tb" / "sft" / "checkpoints" / "last.ckpt"
    again = cli.run_cli(
        ["validate", "--config", CONFIG, *_overrides(out, "validate"), f"--ckpt_path={ckpt}"]
    )
    assert float(again.trainer.callback_metrics["sft/val/loss"]) == pytest.approx(fit_val, rel=1e-5)


def test_bad_record_gives_one_line_file_line_error(sft_run, tmp_path, capsys):
    out, _ = sft_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n'
    )
    argv = ["fit", "--config", CONFIG, *_overrides(tmp_path), f"--data.demonstrations.path={bad}"]
    argv.append(f"--data.tokenizer={out / 'tokenizer'}")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("rlhf: error:")]
    assert lines == [
        f"rlhf: error: {bad}:3: field 'response' is missing (data.demonstrations.path)"
    ]


def test_missing_config_and_model_path_errors(tmp_path, capsys):
    assert cli.main(["fit", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"rlhf: error: {tmp_path / 'nope.yaml'}: config file not found"
    )


def test_print_config_and_model_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", "--config", CONFIG, "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "SFTModule" in printed and "model_spec:" in printed and "max_steps: 400" in printed
    with pytest.raises(SystemExit):
        cli.main(["fit", "--model.help", "SFTModule"])
    helptext = capsys.readouterr().out
    assert "--model.samples.help" in helptext and "SFTSampleConfig" in helptext
    parser = ArgumentParser()  # the nested help: the dataclass's field docstrings
    parser.add_class_arguments(SFTSampleConfig, "samples")
    samples_help = " ".join(parser.format_help().split())
    assert "--samples.every_n_steps" in samples_help
    assert "every this many optimizer steps" in samples_help


def test_label_subcommand_dispatch(monkeypatch):
    seen = {}
    fake = types.ModuleType("rlhf_lightning.labeling")
    fake.main = lambda argv, run_state: seen.setdefault("argv", argv) and {"written": 1}
    monkeypatch.setitem(sys.modules, "rlhf_lightning.labeling", fake)
    assert cli.main(["label", "--num_responses", "4"]) == 0
    assert seen["argv"] == ["--num_responses", "4"]


@pytest.mark.parametrize("name", ["SFTModule", "RewardModule", "PPOModule"])
def test_stage_modules_have_short_names(name, capsys):
    """The CLI imports every stage module, so each LightningModule resolves by its short name."""
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", "--model.help", name])
    assert info.value.code == 0
    assert f"Help for --model.help=rlhf_lightning.{name}" in capsys.readouterr().out


def test_bf16_mixed_with_gradient_clipping_fits(tmp_path):
    """Lightning refuses to clip a fused optimizer under mixed precision: the modules fall back
    to the unfused AdamW there (fused elsewhere, e.g. 32-true as in the sft_run fixture)."""
    prepare(tmp_path, num_train=32, num_val=16, num_prompts=4)
    args = [
        a for a in _overrides(tmp_path, "bf16") if "max_steps" not in a and "val_check" not in a
    ]
    run = cli.run_cli(
        [
            "fit",
            "--config",
            CONFIG,
            *args,
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.precision=bf16-mixed",
            "--trainer.gradient_clip_val=1.0",
        ]
    )
    assert run.trainer.global_step == 2
    assert run.trainer.optimizers[0].defaults["fused"] is False
    assert torch.isfinite(run.trainer.callback_metrics["sft/val/loss"])


def test_fused_adamw_under_full_precision(sft_run):
    _, run = sft_run
    assert run.trainer.optimizers[0].defaults["fused"] is True
