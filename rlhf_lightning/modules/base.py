"""What the three stage modules (SFT, reward model, PPO) share: constructor convention,
hparams, tokenizer access, export dir.

- Constructor convention: `__init__(model_spec: ModelSpec, <config dataclasses>, export_dir)`;
  each config argument is a dataclass with one docstring per field (null = its defaults, a dict
  from a checkpoint or YAML is accepted: `coerce_config`), and `save_plain_hparams()` records them.
- `save_plain_hparams()`: `save_hyperparameters()` of the calling `__init__`, dataclass values
  stored as plain dicts, so that checkpoints load with `torch.load(weights_only=True)`. Under the
  CLI the hparams are its config dump (with `_class_path`, used by `--ckpt_path` resume).

- `tokenizer`: the attached `RLHFDataModule`'s tokenizer, read once and cached; settable
  (`module.tokenizer = tok`) for use without a datamodule (tests, benchmarks). Without either,
  a one-line error naming the module.
- `setup()`: lets glibc keep freed memory for reuse (`rlhf_lightning.runtime`), in every process
  Lightning starts, however the module is run.
- `configure_callbacks()`: `OneDNNLinearCallback` (float32 CPU linear layers on oneDNN where
  `RLHF_CPU_MATMUL` says so: `rlhf_lightning.kernels.onednn_linear`).
- `resolved_export_dir()`: `export_dir`, else `<log_dir>/export` — the first logger's folder,
  the trainer's `default_root_dir` when there is no logger folder, `./export` with no trainer.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, is_dataclass
from pathlib import Path

import lightning.pytorch as pl

from rlhf_lightning.modules.cpu_linear import OneDNNLinearCallback
from rlhf_lightning.runtime import retain_freed_memory

__all__ = ["StageModule", "coerce_config"]


def coerce_config(cls, value):
    """A config dataclass from an instance, a dict (e.g. from a checkpoint) or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls(**value)
    return value


class StageModule(pl.LightningModule):
    """A LightningModule of one RLHF stage (subclasses set `export_dir` in `__init__`)."""

    export_dir: str | None = None

    def setup(self, stage: str) -> None:
        """Before `configure_model`: the process's allocator settings (`runtime`)."""
        retain_freed_memory()

    def configure_callbacks(self) -> list[pl.Callback]:
        """The callbacks every stage runs with: `OneDNNLinearCallback`."""
        return [OneDNNLinearCallback()]

    def save_plain_hparams(self) -> None:
        """`save_hyperparameters()` of the calling `__init__`, with dataclasses stored as dicts."""
        caller = inspect.currentframe().f_back  # the subclass __init__ whose arguments are saved
        self.save_hyperparameters(frame=caller)
        for hparams in (self.hparams, self._hparams_initial):
            for key, value in list(hparams.items()):
                if is_dataclass(value):
                    hparams[key] = asdict(value)

    @property
    def tokenizer(self):
        """The tokenizer of the stage (vocabulary size, special ids, decoding, export)."""
        cached = self.__dict__.get("_tokenizer")
        if cached is not None:
            return cached
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "tokenizer"):
            raise RuntimeError(
                f"{type(self).__name__} needs a tokenizer: attach an RLHFDataModule to the "
                "Trainer or set `module.tokenizer`"
            )
        self.__dict__["_tokenizer"] = datamodule.tokenizer
        return self.__dict__["_tokenizer"]

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self.__dict__["_tokenizer"] = value

    def resolved_export_dir(self) -> Path:
        """`export_dir`, or `<log_dir>/export` (`default_root_dir` when the logger has no folder;
        the working directory without a trainer)."""
        if self.export_dir:
            return Path(self.export_dir)
        trainer = self._trainer
        base = (trainer.log_dir or trainer.default_root_dir) if trainer is not None else "."
        return Path(base) / "export"
