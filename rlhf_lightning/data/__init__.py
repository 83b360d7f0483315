"""Data: typed records, sources, prompt templates, collators and the RLHFDataModule.

`from rlhf_lightning.data import RLHFDataModule, DataSource, RecordError` is the usual entry.
"""

from .records import KINDS, Comparison, Demonstration, PromptRecord, RecordError, parse_record
from .sources import DataSource
from .templates import render_prompt

__all__ = [
    "KINDS",
    "Comparison",
    "DataSource",
    "Demonstration",
    "PromptRecord",
    "RLHFDataModule",
    "RecordError",
    "parse_record",
    "render_prompt",
]


def __getattr__(name):
    # Lazy: importing the datamodule pulls in lightning.
    if name == "RLHFDataModule":
        from .datamodule import RLHFDataModule

        return RLHFDataModule
    raise AttributeError(f"module 'rlhf_lightning.data' has no attribute {name!r}")
