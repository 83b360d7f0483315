"""RLHFDataModule: one LightningDataModule serving demonstrations, preferences and prompts.

Each record kind has its own optional `DataSource`. Records are parsed once (`setup`), split
into train/val deterministically, and tokenised lazily per (kind, split) the first time a
dataloader asks for them. Attached to a Trainer, `train_dataloader()` / `val_dataloader()` serve
the kind named by the LightningModule's `data_kind` class attribute; any kind is available on
demand through `dataloader(kind, split)` (PPO-ptx uses demonstrations next to its prompts).

Nothing is dropped silently: malformed rows (only with `on_invalid: skip`), left-truncated
prompts and records too long to fit are counted in `dm.stats` and announced with one rank-zero
warning per (kind, split). A source, or a split of it, left without any record (an empty file,
every row malformed under `on_invalid: skip`, every record too long) stops at `setup()` /
dataset build with a `RecordError` naming it and the counts ("no usable records").

References: Lightning DataModule (https://lightning.ai/docs/pytorch/stable/data/datamodule.html);
batch layouts and field conventions in `collate.py` and `records.py`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from rlhf_lightning.models.loading import resolve_source

from .collate import COLLATORS
from .records import KINDS, RecordError, check_kind, parse_record
from .sampling import EpochShuffleSampler, ResumableDataLoader
from .sources import (
    DataSource,
    memory_rows,
    no_usable_records,
    partition_of,
    read_rows,
    rows_name,
    split_indices,
    take,
)
from .templates import Tokenizing, TokenStats

SPLITS = ("train", "val")
_SOURCE_ARG = {"demonstration": "demonstrations", "preference": "preferences", "prompt": "prompts"}


class ListDataset(Dataset):
    """A map-style dataset over a list of tokenised examples."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def load_tokenizer(name: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """`AutoTokenizer.from_pretrained`, with the pad token set to EOS when it has none."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_source(name), **kwargs)
    except (OSError, ValueError) as err:  # missing dir/package, unknown hub id, offline, bad GGUF
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecordError(f"data field 'tokenizer': cannot load {name!r}: {first_line}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class RLHFDataModule(pl.LightningDataModule):
    """Demonstrations (SFT), preferences (reward model) and prompts (PPO) from files or datasets."""

    def __init__(
        self,
        tokenizer: str,
        tokenizer_gguf_file: str | None = None,
        demonstrations: DataSource | None = None,
        preferences: DataSource | None = None,
        prompts: DataSource | None = None,
        max_length: int = 512,
        max_prompt_length: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        trust_remote_code: bool = False,
    ):
        """Configure the data; nothing is read until `setup()` or the first dataloader call.

        Args:
            tokenizer: tokenizer to load with `AutoTokenizer.from_pretrained` (hub id or local
                folder, usually the policy's). A tokenizer object is also accepted from Python.
                Its pad token is set to its EOS token when missing; padding sides are chosen
                by the collators (right for SFT/RM, left for prompts), not by the tokenizer.
            tokenizer_gguf_file: GGUF file name inside `tokenizer` to read the tokenizer from.
            demonstrations: source of demonstration records (SFT; PPO-ptx).
            preferences: source of preference records, pairs or K-wise rankings (reward model).
            prompts: source of prompts (PPO rollouts, labeling); any record layout works, its
                prompt part is used.
            max_length: maximum tokens of one row, prompt + response + EOS (SFT and RM).
            max_prompt_length: maximum prompt tokens; longer prompts are left-truncated.
                Responses are never truncated: records that cannot fit are skipped and counted.
            batch_size: training batch size; for preferences it counts prompts (groups), each
                bringing its 2..K responses as rows.
            eval_batch_size: validation batch size; None = `batch_size`.
            seed: seed of the train/val split and of the training-order shuffle.
            num_workers: DataLoader worker processes (0 = load in the main process).
            trust_remote_code: allow custom tokenizer code from the hub (off unless needed).
        """
        super().__init__()
        self.tokenizer_name = tokenizer
        self.tokenizer_gguf_file = tokenizer_gguf_file
        self.sources: dict[str, DataSource | None] = {
            "demonstration": demonstrations,
            "preference": preferences,
            "prompt": prompts,
        }
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.seed, self.num_workers = seed, num_workers
        self.trust_remote_code = trust_remote_code
        self._tokenizer = None
        self._records: dict[tuple[str, str], list] | None = None
        self._datasets: dict[tuple[str, str], ListDataset] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self._resume_state: dict[str, Any] | None = None  # from a checkpoint, see load_state_dict

    # ----------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self):
        """The tokenizer, loaded once (pad token = EOS when it has none)."""
        if self._tokenizer is None:
            if isinstance(self.tokenizer_name, str):
                self._tokenizer = load_tokenizer(
                    self.tokenizer_name, self.tokenizer_gguf_file, self.trust_remote_code
                )
            else:
                self._tokenizer = self.tokenizer_name
                if self._tokenizer.pad_token is None:
                    self._tokenizer.pad_token = self._tokenizer.eos_token
        return self._tokenizer

    # ------------------------------------------------------------------- records
    def setup(self, stage: str | None = None) -> None:
        """Parse every configured source once and split it into train/val."""
        if self._records is not None:
            return
        records = {}
        for kind in KINDS:
            source = self.sources[kind]
            if source is None:
                continue
            train, val, read = self._load_source(kind, source)
            records[(kind, "train")], records[(kind, "val")] = train, val
            self.stats.setdefault(kind, {})["read"] = read
        self._records = records

    def _parse(self, kind: str, source: DataSource, rows, name: str) -> tuple[list, dict[str, int]]:
        """Parse rows; bad rows raise, or are counted and warned about with on_invalid=skip.

        With `source.partition`, records of the other parts are dropped and counted
        (`other_parts`), and `source.limit` counts the records kept.

        A source left without records (empty, or every row skipped) raises, naming it (`name`).
        """
        out, errors, n_rows, other_parts = [], [], 0, 0
        part = source.partition
        for where, raw in take(rows, None if part else source.limit):
            if part and source.limit is not None and len(out) >= source.limit:
                break
            n_rows += 1
            try:
                if isinstance(raw, RecordError):
                    raise raw
                record = parse_record(raw, kind, where, source.fields)
            except RecordError as err:
                if source.on_invalid == "raise":
                    raise
                errors.append(str(err))
                continue
            if part and partition_of(record.prompt, part) != part.keep:
                other_parts += 1
            else:
                out.append(record)
        if not out:
            name = f"{name} (partition part {part.keep!r})" if part and other_parts else name
            raise no_usable_records(name, n_rows - other_parts, errors)
        if errors:
            first = "; ".join(errors[:3])
            rank_zero_warn(
                f"{kind}: skipped {len(errors)} of {n_rows} malformed rows, e.g. {first}"
            )
        read = {"rows": n_rows, "invalid": len(errors)}
        return out, ({**read, "other_parts": other_parts} if part else read)

    def _rows(self, source: DataSource, path: str | None, split: str):
        if path is None:
            return memory_rows(source.records or [])
        return read_rows(path, split, source.subset)

    def _split_name(self, kind: str, split: str) -> str:
        """The source of one split in messages: a path, `dataset[split]`, or the config key."""
        source = self.sources[kind]
        spec, hf_split = source.path, source.split
        if split == "val" and (source.val_path or source.val_split):
            spec = source.val_path or source.path
            hf_split = source.val_split or source.split
        name = f"data.{_SOURCE_ARG[kind]}.records" if spec is None else rows_name(spec, hf_split)
        held_out = split == "val" and not (source.val_path or source.val_split)
        return f"{name} (val_fraction split)" if held_out else name

    def _load_source(self, kind: str, source: DataSource) -> tuple[list, list, dict[str, int]]:
        rows = self._rows(source, source.path, source.split)
        train, read = self._parse(kind, source, rows, self._split_name(kind, "train"))
        val_spec = source.val_path or (source.val_split and source.path)
        if val_spec:
            val_split = source.val_split or source.split
            rows = self._rows(source, val_spec, val_split)
            val, val_read = self._parse(kind, source, rows, self._split_name(kind, "val"))
            read = {key: read[key] + val_read[key] for key in read}
            return train, val, read
        train_idx, val_idx = split_indices(len(train), source.val_fraction, self.seed)
        return [train[i] for i in train_idx], [train[i] for i in val_idx], read

    def _check_source(self, kind: str) -> None:
        check_kind(kind)
        if self.sources[kind] is None:
            raise ValueError(
                f"no data source for kind '{kind}': set `data.{_SOURCE_ARG[kind]}` "
                f"(e.g. `--data.{_SOURCE_ARG[kind]}.path train.jsonl`)"
            )

    def records(self, kind: str, split: str = "train") -> list:
        """Parsed records of `kind` ("demonstration" | "preference" | "prompt") for a split."""
        self._check_source(kind)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (expected 'train' or 'val')")
        self.setup()
        return self._records[(kind, split)]

    # ------------------------------------------------------------------ datasets
    def dataset(self, kind: str, split: str = "train") -> ListDataset:
        """Tokenised examples of `kind`/`split` (built once; truncation counted in `stats`)."""
        key = (kind, split)
        if key not in self._datasets:
            records = self.records(kind, split)
            stats = TokenStats()
            tokenizing = Tokenizing(self.tokenizer, self.max_length, self.max_prompt_length)
            examples = tokenizing.tokenize(kind, records, stats)
            self.stats.setdefault(kind, {})[split] = stats.as_dict()
            self._warn(kind, split, stats)
            error = stats.nothing_left(self._split_name(kind, split), self.max_length)
            if error is not None:
                raise error
            self._datasets[key] = ListDataset(examples)
        return self._datasets[key]

    def _warn(self, kind: str, split: str, stats: TokenStats) -> None:
        rank_zero_info(f"RLHFDataModule {kind}/{split}: {stats.as_dict()}")
        if not (stats.truncated or stats.skipped):
            return
        rank_zero_warn(
            f"{kind}/{split}: {stats.truncated} of {stats.records} prompts left-truncated "
            f"(max_prompt_length={self.max_prompt_length}, max_length={self.max_length}); "
            f"{stats.skipped} records skipped because their responses alone exceed max_length"
        )

    def dataloader(
        self,
        kind: str,
        split: str = "train",
        batch_size: int | None = None,
        shuffle: bool | None = None,
        shard: tuple[int, int] = (1, 0),
    ) -> DataLoader:
        """A DataLoader over any kind and split; shuffles (seeded) the train split by default.
        `shard` = (ranks, rank): serve that data-parallel rank's share (the Trainer's loaders)."""
        dataset = self.dataset(kind, split)
        if batch_size is None:
            batch_size = self.batch_size if split == "train" else self.eval_batch_size
        shuffle = split == "train" if shuffle is None else shuffle
        ranks, rank = shard
        sampler = EpochShuffleSampler(
            len(dataset), seed=self.seed, shuffle=shuffle, num_replicas=ranks, rank=rank
        )
        pad_id = self.tokenizer.pad_token_id
        return ResumableDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=partial(COLLATORS[kind], pad_id=pad_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    # ------------------------------------------------------- Lightning hooks
    def _trainer_kind(self) -> str:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer else None
        kind = getattr(module, "data_kind", None)
        if kind is None:
            raise RuntimeError(
                "RLHFDataModule needs a Trainer whose LightningModule sets `data_kind`; "
                "standalone, call dm.dataloader(kind, split)"
            )
        return check_kind(kind)

    def train_dataloader(self) -> DataLoader:
        """Training batches of the attached module's `data_kind`; resumes mid-epoch exactly."""
        loader = self.dataloader(self._trainer_kind(), "train", shard=self._trainer_shard())
        loader.consumed = self._batches_consumed_in_epoch
        if self._resume_state is not None:
            # Lightning restores loader states only for a loader built after the checkpoint is
            # read; a loader built earlier (e.g. by `estimated_stepping_batches` in
            # `configure_optimizers`) gets the position from the datamodule's own state instead.
            loader.load_state_dict(self._resume_state)
            self._resume_state = None
        return loader

    def state_dict(self) -> dict[str, Any]:
        """Data position saved with every checkpoint (see `ResumableDataLoader`)."""
        return {"batches_consumed_in_epoch": self._batches_consumed_in_epoch(), "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved data position for the next train dataloader."""
        self._resume_state = dict(state_dict)

    def _batches_consumed_in_epoch(self) -> int:
        loop = self.trainer.fit_loop if self.trainer is not None else None
        if loop is None:
            return 0
        processed = int(loop.epoch_loop.batch_progress.current.processed)
        # A finished epoch resumes at the start of the next one: nothing to skip.
        return 0 if processed >= self.trainer.num_training_batches else processed

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches of the module's `data_kind`; [] (no validation) when empty."""
        kind = self._trainer_kind()
        if not self.records(kind, "val"):
            return []
        return self.dataloader(kind, "val", shard=self._trainer_shard())

    def _trainer_shard(self) -> tuple[int, int]:
        """(world size, global rank) of the attached Trainer: each DDP rank reads its share."""
        return (getattr(self.trainer, "world_size", 1), getattr(self.trainer, "global_rank", 0))
