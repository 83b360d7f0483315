"""The `rlhf` command: a LightningCLI over the stage modules and the shared datamodule.

    rlhf fit --config configs/quickstart/sft.yaml        # train a stage
    rlhf validate --config ... --ckpt_path last.ckpt     # evaluate
    rlhf fit --config ... --print_config                 # show the fully resolved config
    rlhf fit --model SFTModule --model.help SFTModule    # every init option, documented
    rlhf label ...                                       # rank sampled responses (labeling.py)

Models are given in subclass mode, so `--model SFTModule` (short name) or a full
class path both work; the data always goes through `RLHFDataModule`. Bad input
(malformed records, missing files, invalid model specs) ends with one line on
stderr and exit code 2 instead of a traceback.

References: LightningCLI (https://lightning.ai/docs/pytorch/stable/cli/lightning_cli.html),
jsonargparse (https://jsonargparse.readthedocs.io).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

# Stage modules registered for short names. Modules not written yet are tolerated.
STAGE_MODULES = (
    "rlhf_lightning.modules.sft",
    "rlhf_lightning.modules.reward",
    "rlhf_lightning.modules.ppo",
)


def register_stage_modules() -> list[str]:
    """Import every stage module that exists (so its LightningModule gets a short name)."""
    loaded = []
    for name in STAGE_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency inside the module: surface it
                raise
            continue
        loaded.append(name)
    return loaded


def _input_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad user input (reported in one line, exit code 2)."""
    errors: list[type[BaseException]] = [FileNotFoundError]
    try:
        from rlhf_lightning.data.records import RecordError

        errors.append(RecordError)
    except ModuleNotFoundError:
        pass
    from rlhf_lightning.models.loading import ModelSpecError

    errors.append(ModelSpecError)
    return tuple(errors)


def _make_cli_class():
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import LightningCLI

    class RLHFCLI(LightningCLI):
        """LightningCLI with subclass-mode models and the shared RLHFDataModule."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.set_defaults({"trainer.logger": _default_logger()})

    return RLHFCLI, LightningModule


_DESCRIPTION = (
    "RLHF stages on PyTorch Lightning: `rlhf fit|validate --config X.yaml` trains/evaluates a "
    "stage (--model SFTModule|RewardModule|PPOModule); `rlhf label --config X.yaml` ranks "
    "sampled responses with a labeler."
)


def _default_logger() -> dict:
    return {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "rlhf"},
    }


def run_cli(args: Sequence[str] | None = None, *, run: bool = True):
    """Build (and by default run) the LightningCLI on `args`; returns the CLI object."""
    from jsonargparse import set_parsing_settings

    from rlhf_lightning.data.datamodule import RLHFDataModule

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    register_stage_modules()
    cli_class, base = _make_cli_class()
    with warnings.catch_warnings():
        # In-process callers pass `args` on purpose; Lightning warns when sys.argv is also set.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return cli_class(
            model_class=base,
            datamodule_class=RLHFDataModule,
            subclass_mode_model=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "rlhf", "description": _DESCRIPTION},
            args=list(args) if args is not None else None,
            run=run,
        )


def _label(argv: list[str]) -> int:
    try:
        labeling = importlib.import_module("rlhf_lightning.labeling")
    except ModuleNotFoundError as err:
        if err.name != "rlhf_lightning.labeling":
            raise
        print("rlhf label: not available in this installation", file=sys.stderr)
        return 2
    result = labeling.main(argv)
    return result if isinstance(result, int) else 0


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
    """Console entry point: `rlhf label ...` or a LightningCLI subcommand."""
    args = list(sys.argv[1:] if argv is None else argv)
    input_errors = _input_errors()
    try:
        check_config_paths(args)
        if args and args[0] == "label":
            return _label(args[1:])
        # args=None lets LightningCLI read sys.argv itself (it warns when given both).
        run_cli(None if argv is None else args)
    except input_errors as err:
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, FileNotFoundError) and err.filename:
            message = f"{err.filename}: {err.strerror or message}"
        print(f"rlhf: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
