"""Config and command-line errors end in one `rlhf: error: <what> (<key>)` line with exit code 2.

In-process through `cli.main` (stderr via capsys), plus one subprocess run for the real exit
code. `--debug` / `RLHF_DEBUG=1` re-raise; errors after the first batch keep their traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  (its log handler binds sys.stderr now, not capsys's)
import pytest

from rlhf_lightning import cli, cli_errors
from rlhf_lightning.tasks.sentiment import prepare

REPO = Path(__file__).resolve().parents[1]
SFT_CONFIG = str(REPO / "configs" / "quickstart" / "sft.yaml")

PPO_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 2
  default_root_dir: "{root}"
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
model:
  class_path: PPOModule
  init_args:
    model_spec: {model_spec}
    reward: {reward}
    kl: {{estimator: {estimator}}}
    critic: {{kind: {critic}}}
    generation: {{max_new_tokens: 4}}
    update: {{ppo_epochs: 1, num_minibatches: 1}}
    export_dir: "{root}/export"
data:
  tokenizer: "{root}/tok"
  prompts: {{path: "{root}/prompts.jsonl", val_fraction: 0.0}}
  batch_size: 4
"""
TINY_POLICY = (
    "{config: {model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
    "num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 64}}"
)
TOY_REWARD = "{function: rlhf_lightning.ppo.toy:word_frequency, normalize: none}"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The embedded task's tokenizer and a few demonstrations, shared by the SFT cases."""
    out = tmp_path_factory.mktemp("cli_errors")
    prepare(out, num_train=16, num_val=4, num_prompts=4)
    return out


def sft_args(task: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        SFT_CONFIG,
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--trainer.max_steps=1",
        f"--trainer.default_root_dir={out}",
        f"--model.init_args.export_dir={out / 'export'}",
        f"--data.tokenizer={task / 'tokenizer'}",
        f"--data.demonstrations.path={task / 'data' / 'sft_train.jsonl'}",
        f"--data.demonstrations.val_path={task / 'data' / 'sft_val.jsonl'}",
        *extra,
    ]


def ppo_config(tmp_path: Path, tokenizer, **fields: str) -> str:
    tokenizer.save_pretrained(tmp_path / "tok")
    rows = [{"prompt": f"the movie was {w}"} for w in ("great", "boring", "fine", "bad")]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = {"model_spec": TINY_POLICY, "reward": TOY_REWARD, "estimator": "k1", "critic": "auto"}
    config = tmp_path / "ppo.yaml"
    config.write_text(PPO_CONFIG.format(root=tmp_path, **{**values, **fields}))
    return str(config)


def error_line(argv: list[str], capsys) -> str:
    """Run `rlhf` in-process; assert exit 2, no traceback, and return the single error line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("rlhf: error: ")]
    assert len(lines) == 1, err
    assert err.rstrip().endswith(lines[0])  # the error is the last thing printed
    return lines[0]


# ------------------------------------------------------------------ Trainer, model, data
def test_fsdp_strategy_on_cpu(task, tmp_path, capsys):
    line = error_line(sft_args(task, tmp_path, "--trainer.strategy=fsdp"), capsys)
    assert line.startswith("rlhf: error: The strategy `fsdp` requires a GPU accelerator")
    assert line.endswith("(trainer.strategy, trainer.accelerator)")


def test_model_path_that_does_not_exist(task, tmp_path, capsys):
    missing = tmp_path / "no" / "model"
    config = tmp_path / "model.yaml"
    config.write_text(
        f"model:\n  init_args:\n    model_spec: {{config: null, name_or_path: {missing}}}\n"
    )
    line = error_line(sft_args(task, tmp_path, "--config", str(config)), capsys)
    assert line == (
        f"rlhf: error: model field 'name_or_path': cannot load '{missing}': no such directory "
        "(model.init_args.model_spec.name_or_path)"
    )
    assert not (tmp_path / "export").exists()


def test_data_file_that_does_not_exist(task, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    line = error_line(sft_args(task, tmp_path, f"--data.demonstrations.path={missing}"), capsys)
    assert line == f"rlhf: error: {missing}: file not found (data.demonstrations.path)"


def test_empty_data_file_stops_before_training(task, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = error_line(sft_args(task, tmp_path, f"--data.demonstrations.path={empty}"), capsys)
    assert (
        line == f"rlhf: error: {empty}: no usable records (0 rows read) (data.demonstrations.path)"
    )
    assert not (tmp_path / "export").exists()


def test_mistyped_data_option_names_its_key(task, tmp_path, capsys):
    line = error_line(sft_args(task, tmp_path, "--data.demonstrations.on_invalid=skpi"), capsys)
    assert line == (
        "rlhf: error: DataSource.on_invalid must be 'raise' or 'skip' (got 'skpi') "
        "(data.demonstrations.on_invalid)"
    )


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("estimator", "k4", "'k4' is not one of k1, k2, k3, full (model.init_args.kl.estimator)"),
        ("critic", "value", "'value' is not one of auto, reward_model, policy_copy, value_head, none (model.init_args.critic.kind)"),
    ],
)  # fmt: skip
def test_mistyped_ppo_enum_option(tmp_path, tiny_tokenizer, capsys, field, value, expected):
    config = ppo_config(tmp_path, tiny_tokenizer, **{field: value})
    assert error_line(["fit", "--config", config], capsys) == f"rlhf: error: {expected}"


def test_reward_model_dir_without_export_files(tmp_path, tiny_tokenizer, capsys):
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    (rm_dir / "config.json").write_text("{}")
    config = ppo_config(tmp_path, tiny_tokenizer, reward=f"{{model: {rm_dir}, normalize: none}}")
    line = error_line(["fit", "--config", config], capsys)
    assert line == (
        f"rlhf: error: {rm_dir}: not a reward-model export (missing model.safetensors or "
        "model.safetensors.index.json or pytorch_model.bin; tokenizer.json or "
        "tokenizer_config.json) (model.init_args.reward.model)"
    )


# ------------------------------------------------------------------ jsonargparse's own errors
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--trainer.no_such_option=1"], "rlhf: error: unrecognized arguments: --trainer.no_such_option=1"),
        (["--trainer.max_steps=many"], "rlhf: error: Expected a <class 'int'>. Got value: many (trainer.max_steps)"),
        (["--model.init_args.optim.lr=fast"], "rlhf: error: Expected a <class 'float'>. Got value: fast (model.optim.lr)"),
        (["--model=NoSuchModule"], "rlhf: error: Expected a dot import path string: NoSuchModule (model)"),
    ],
)  # fmt: skip
def test_parse_errors_are_one_line(task, tmp_path, capsys, extra, expected):
    assert error_line(sft_args(task, tmp_path, *extra), capsys) == expected


def test_label_config_errors_are_one_line(tmp_path, capsys):
    line = error_line(["label", "--config", str(REPO / "configs/quickstart/label.yaml"), "--num_responses=1"], capsys)  # fmt: skip
    assert line == "rlhf: error: must be >= 2 to rank, got 1 (num_responses)"
    line = error_line(["label", "--labeler=x:y", "--nope=1"], capsys)
    assert line == "rlhf: error: unrecognized arguments: --nope=1"


# ------------------------------------------------------------------ debug switch, late errors
def test_debug_flag_and_env_re_raise_with_the_traceback(task, tmp_path, monkeypatch):
    argv = sft_args(task, tmp_path, "--trainer.strategy=fsdp")
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        cli.main(["--debug", *argv])
    monkeypatch.setenv(cli_errors.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        cli.main(argv)


def test_console_entry_exits_2_with_one_line(task, tmp_path):
    """The real entry point (`python -m rlhf_lightning`), for the process exit code."""
    argv = [sys.executable, "-m", "rlhf_lightning", *sft_args(task, tmp_path, "--trainer.strategy=fsdp")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(cli_errors.DEBUG_ENV, None)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("rlhf: error: The strategy `fsdp`")


def test_errors_after_the_first_batch_keep_their_traceback(tmp_path, tiny_tokenizer, monkeypatch):
    import rlhf_lightning.ppo.toy as toy

    def broken_reward(prompts, responses):
        raise ValueError("reward service returned garbage")

    monkeypatch.setattr(toy, "broken_reward", broken_reward, raising=False)
    reward = "{function: rlhf_lightning.ppo.toy:broken_reward, normalize: none}"
    config = ppo_config(tmp_path, tiny_tokenizer, reward=reward)
    with pytest.raises(ValueError, match="reward service returned garbage"):
        cli.main(["fit", "--config", config])


def test_only_bad_records_stay_one_line_after_the_first_batch():
    """A FileNotFoundError or ModelSpecError raised mid-training comes from user code (a reward
    function, a callback): a bug to debug with its traceback, not a config error."""
    from rlhf_lightning.data.records import RecordError
    from rlhf_lightning.models.loading import ModelSpecError

    missing = FileNotFoundError(2, "No such file or directory", "lexicon.txt")
    before, after = cli_errors.RunState(), cli_errors.RunState(stepping=True)
    for err in (missing, ModelSpecError("bad spec"), ValueError("bad value")):
        assert cli_errors.reportable(err, before) and not cli_errors.reportable(err, after)
    record = RecordError("demos.jsonl:3: field 'response' is missing")
    assert cli_errors.reportable(record, before) and cli_errors.reportable(record, after)


def test_fp16_with_a_separate_critic_is_refused():
    """Lightning's 16-mixed scaler unscales/updates once per optimizer (CPU turns 16-mixed into
    bf16-mixed, so the rule is checked directly)."""
    from rlhf_lightning.modules.ppo import refuse_fp16_two_optimizers

    with pytest.raises(ValueError, match="trainer.precision=16-mixed with a separate critic"):
        refuse_fp16_two_optimizers("16-mixed", "policy_copy")
    for precision in ("bf16-mixed", "32-true", "32"):
        refuse_fp16_two_optimizers(precision, "policy_copy")


def test_ptx_without_demonstrations_fails_before_the_first_rollout(
    tmp_path, tiny_tokenizer, capsys
):
    config = ppo_config(tmp_path, tiny_tokenizer)
    line = error_line(["fit", "--config", config, "--model.init_args.update.ptx_coef=0.5"], capsys)
    assert line.startswith("rlhf: error: ") and "demonstration" in line


def test_config_keys_from_mentions_quoted_values_and_names():
    config = {
        "model": {
            "class_path": "rlhf_lightning.PPOModule",
            "init_args": {"kl": {"estimator": "k4"}, "model_spec": {"name_or_path": "runs/p"}},
        },
        "data": {"tokenizer": "runs/p", "max_length": 1, "max_prompt_length": 4},
    }
    keys = cli_errors.config_keys
    assert keys("model.kl.estimator: 'k4' is not one of k1", config, "model") == [
        "model.init_args.kl.estimator"
    ]
    # the failing part narrows a value shared by two keys; without it both are named
    assert keys("cannot load 'runs/p'", config, "model") == [
        "model.init_args.model_spec.name_or_path"
    ]
    assert keys("cannot load 'runs/p'", config) == [
        "data.tokenizer",
        "model.init_args.model_spec.name_or_path",
    ]
    assert keys("need max_length >= 2 (got 1)", config, "data") == ["data.max_length"]
    assert keys("no key named here", config, "trainer") == ["trainer"]
