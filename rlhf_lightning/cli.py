"""The `rlhf` command: a LightningCLI over the stage modules and the shared datamodule.

    rlhf fit --config configs/quickstart/sft.yaml        # train a stage
    rlhf validate --config ... --ckpt_path last.ckpt     # evaluate
    rlhf fit --config ... --print_config                 # show the fully resolved config
    rlhf fit --config base.yaml --config overlay.yaml    # later files override earlier ones
    rlhf fit --model SFTModule --model.help SFTModule    # every init option, documented
    rlhf label ...                                       # rank sampled responses (labeling.py)
    rlhf evaluate --config configs/quickstart/evaluate.yaml  # compare policies (evaluation/)
    rlhf --debug fit ...   (or RLHF_DEBUG=1 rlhf fit ...)  # full tracebacks instead of one line

Models are given in subclass mode, so `--model SFTModule` (short name) or a full
class path both work; the data always goes through `RLHFDataModule`.

Errors end with one line on stderr, `rlhf: error: <what> (<config key>)`, and exit code 2 when
they are bad input: command-line / config parse errors (jsonargparse), bad records (`file:line`)
at any time (demonstrations for PPO-ptx are read lazily), and any error raised while the Trainer,
model and data are built and set up (`configure_model`, dataloaders, checkpoint restore) before the
first batch starts — missing files and bad model specs included. Other errors after that are
program errors and keep their traceback. The config key is
found from the part that failed (model / data / trainer, from the traceback) and the values or
key names the message quotes. `--debug` anywhere on the command line, or `RLHF_DEBUG=1`, turns
this off: the exception propagates with its full traceback (and parse errors print jsonargparse's
usage text).

References: LightningCLI (https://lightning.ai/docs/pytorch/stable/cli/lightning_cli.html),
jsonargparse (https://jsonargparse.readthedocs.io).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_lightning.cli_errors import RunState, debug_switch, error_line, reportable
from rlhf_lightning.runtime import retain_freed_memory

_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def register_stage_modules() -> None:
    """Import the stage modules, so that `--model SFTModule|RewardModule|PPOModule` resolves."""
    from rlhf_lightning.modules import ppo, reward, sft  # noqa: F401


# ------------------------------------------------------------------ the LightningCLI
def _make_cli_class(state: RunState | None):
    from lightning.pytorch import Callback, LightningModule
    from lightning.pytorch.cli import LightningCLI

    class StepWatch(Callback):
        """Marks the start of the first batch: later errors are not config errors."""

        def _began(self, *args, **kwargs) -> None:
            state.stepping = True

        on_train_batch_start = on_validation_batch_start = _began
        on_test_batch_start = on_predict_batch_start = _began

    class RLHFCLI(LightningCLI):
        """LightningCLI with subclass-mode models and the shared RLHFDataModule."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.set_defaults({"trainer.logger": _default_logger()})

        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            if state is not None:
                sub = self.config.get("subcommand")
                state.config = self.config.get(sub) if sub else self.config

        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            if state is not None:
                trainer.callbacks.append(StepWatch())
            return trainer

    return RLHFCLI, LightningModule


_DESCRIPTION = (
    "RLHF stages on PyTorch Lightning: `rlhf fit|validate --config X.yaml` trains/evaluates a "
    "stage (--model SFTModule|RewardModule|PPOModule); `rlhf label --config X.yaml` ranks "
    "sampled responses with a labeler; `rlhf evaluate --config X.yaml` compares policies "
    "(win rate, KL, best-of-N) judged by a gold scorer. Errors are one line; `--debug` or RLHF_DEBUG=1 shows "
    "the traceback."
)


def _default_logger() -> dict:
    return {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "rlhf"},
    }


def run_cli(args: Sequence[str] | None = None, *, run: bool = True, state: RunState | None = None):
    """Build (and by default run) the LightningCLI on `args`; returns the CLI object.

    With a `state` (as `main` passes), its config and progress are recorded there, and with
    `state.one_line` parse errors raise `jsonargparse.ArgumentError` instead of exiting.
    """
    from jsonargparse import set_parsing_settings

    from rlhf_lightning.data.datamodule import RLHFDataModule

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    register_stage_modules()
    cli_class, base = _make_cli_class(state)
    parser_kwargs: dict[str, Any] = {"prog": "rlhf", "description": _DESCRIPTION}
    if state is not None and state.one_line:
        parser_kwargs["exit_on_error"] = False
        parser_kwargs.update({sub: {"exit_on_error": False} for sub in _SUBCOMMANDS})
    with warnings.catch_warnings():
        # In-process callers pass `args` on purpose; Lightning warns when sys.argv is also set.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return cli_class(
            model_class=base,
            datamodule_class=RLHFDataModule,
            subclass_mode_model=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs=parser_kwargs,
            args=list(args) if args is not None else None,
            run=run,
        )


def _label(argv: list[str], state: RunState) -> int:
    labeling = importlib.import_module("rlhf_lightning.labeling")
    result = labeling.main(argv, run_state=state)
    return result if isinstance(result, int) else 0


def _evaluate(argv: list[str], state: RunState) -> int:
    evaluation = importlib.import_module("rlhf_lightning.evaluation.run")
    evaluation.main(argv, run_state=state)
    return 0


def check_config_paths(args: Sequence[str]) -> None:
    """Raise FileNotFoundError for a `--config PATH` / `--config=PATH` that does not exist."""
    for i, arg in enumerate(args):
        path = None
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(2, "config file not found", path)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: `rlhf label|evaluate ...` or a LightningCLI subcommand; returns the
    exit code."""
    debug, args = debug_switch(sys.argv[1:] if argv is None else argv)
    state = RunState(one_line=not debug)
    try:
        retain_freed_memory()
        check_config_paths(args)
        if args and args[0] == "label":
            return _label(args[1:], state)
        if args and args[0] == "evaluate":
            return _evaluate(args[1:], state)
        run_cli(args, state=state)
    except Exception as err:
        if debug or not reportable(err, state):
            raise
        print(f"rlhf: error: {error_line(err, state)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
