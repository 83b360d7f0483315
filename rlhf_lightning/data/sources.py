"""Data sources: where raw rows come from, and the deterministic train/val split.

A `DataSource` names local files (.json / .jsonl / .parquet, each optionally .gz), a Hugging
Face dataset (hub name or a `save_to_disk` folder), or an in-memory list of dicts. Rows are
yielded with a location string used in error messages:

* JSON lines: `path:LINE` (1-based line number);
* JSON arrays, parquet, HF datasets: `path:row I` (0-based index, as `ds[i]` / `df.iloc[i]`);
* in-memory lists: `records[I]`.

A `.json` file whose first non-blank character is `[` is read as an array of objects; any other
`.json` file is read as JSON lines. File-level problems (missing file, unsupported extension,
unreadable gzip/parquet) always raise; row-level problems (invalid JSON, non-UTF-8 bytes, bad
fields) raise unless `on_invalid="skip"`, in which case they are counted and warned about. A
source that yields no record at all (an empty file, or every row skipped) is an error that names
it and the counts (`no_usable_records`).

References: Hugging Face `datasets.load_dataset` / `load_from_disk`
(https://huggingface.co/docs/datasets/loading).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .records import RecordError

FILE_TYPES = (".json", ".jsonl", ".parquet")
_ALIASES = {".ndjson": ".jsonl"}
Row = tuple[str, Any]  # (location, raw row)


@dataclass
class Partition:
    """A seeded split of a file's records into disjoint named parts, by prompt.

    Each record goes to one part by a hash of (`seed`, its prompt's chat messages): the same
    prompt always lands in the same part, whatever the file order, `limit`, record kind
    (preference / prompt) or the other rows, so two sources reading the same file with different
    `keep` never share a prompt. Part sizes follow `parts` in expectation (hash, not a shuffle).
    """

    parts: dict[str, float]
    """Part name → weight (> 0), e.g. `{proxy: 0.45, gold: 0.45, held_out: 0.10}`; weights are
    normalised to fractions of the records."""
    keep: str
    """The part this source reads; records of the other parts are dropped (counted in stats)."""
    seed: int = 0
    """Seed of the hash; the same seed gives the same parts."""

    def __post_init__(self):
        if not self.parts or any(w <= 0 for w in self.parts.values()):
            raise ValueError(f"DataSource.partition.parts: weights must be > 0 (got {self.parts})")
        if self.keep not in self.parts:
            raise ValueError(
                f"DataSource.partition.keep: {self.keep!r} is not a part "
                f"(parts: {', '.join(self.parts)})"
            )


def partition_of(prompt: list[dict], partition: Partition) -> str:
    """The part of `partition` that a record with this prompt (chat messages) belongs to.

    u = first 8 bytes of sha256("<seed>\\n<prompt as sorted-key JSON>") / 2^64 ∈ [0, 1); the part
    is the first whose cumulative normalised weight exceeds u (in the order of `parts`).
    """
    key = f"{partition.seed}\n{json.dumps(prompt, sort_keys=True, ensure_ascii=False)}"
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    total = sum(partition.parts.values())
    cumulative = 0.0
    for name, weight in partition.parts.items():
        cumulative += weight / total
        if u < cumulative:
            return name
    return name  # u within rounding of 1.0: the last part


@dataclass
class DataSource:
    """Where one kind of records comes from, and how it is split into train/val.

    Args:
        path: a local .json/.jsonl/.parquet file (optionally .gz), a folder written by
            `datasets.Dataset.save_to_disk`, or a Hugging Face dataset name for
            `datasets.load_dataset`. Leave unset when `records` is given.
        val_path: a separate validation file/dataset; when set, `val_fraction` is ignored.
        val_fraction: fraction of the records held out for validation (deterministic under the
            datamodule's seed) when neither `val_path` nor `val_split` is set; 0 = no validation.
        split: the split to read from a Hugging Face dataset (ignored for local files).
        subset: the Hugging Face dataset configuration name (`load_dataset(path, subset)`).
        records: an in-memory list of row dicts, used instead of `path`.
        limit: read at most this many rows from each file/dataset (quick runs); None = all.
        val_split: a Hugging Face split name used as validation data (e.g. "test").
        fields: rename map {our field name: your column name}, e.g.
            {"prompt": "question", "response": "answer"}; unmapped fields keep their names.
        on_invalid: "raise" (default) stops at the first malformed row with a file:line error;
            "skip" drops malformed rows, counts them in `stats` and warns with the first few.
        partition: read only one part of a seeded, prompt-disjoint split of the records
            (`Partition`); `limit` then counts the records kept, and `val_fraction` splits them.
    """

    path: str | None = None
    val_path: str | None = None
    val_fraction: float = 0.05
    split: str = "train"
    subset: str | None = None
    records: list[dict] | None = None
    limit: int | None = None
    val_split: str | None = None
    fields: dict[str, str] | None = None
    on_invalid: str = "raise"
    partition: Partition | None = None

    def __post_init__(self):
        if (self.path is None) == (self.records is None):
            raise ValueError("DataSource needs exactly one of `path` or `records`")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"DataSource.val_fraction must be in [0, 1) (got {self.val_fraction})")
        if self.on_invalid not in ("raise", "skip"):
            raise ValueError(
                f"DataSource.on_invalid must be 'raise' or 'skip' (got {self.on_invalid!r})"
            )


def file_type(path: Path) -> tuple[str, bool]:
    """(extension without .gz, gzipped?) — e.g. ('.jsonl', True) for train.jsonl.gz."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    ext = (
        suffixes[-2] if gz and len(suffixes) > 1 else (suffixes[-1] if suffixes and not gz else "")
    )
    return _ALIASES.get(ext, ext), gz


def _looks_local(spec: str) -> bool:
    """A path-like spec (explicit folder prefix or a data-file extension) vs a hub dataset name."""
    ext, gz = file_type(Path(spec))
    return spec.startswith(("/", ".", "~")) or gz or ext in FILE_TYPES or ext in (".csv", ".txt")


def _read_bytes(path: Path, gz: bool) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    except (OSError, EOFError) as err:  # BadGzipFile is an OSError
        raise RecordError(f"{path}: cannot read file ({err})") from None


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(
            f"{where}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {err.start + 1})"
        ) from None


def _json_lines(name: str, data: bytes) -> Iterator[Row]:
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            text = _decode(line, where)
            yield where, json.loads(text)
        except json.JSONDecodeError as err:
            yield where, RecordError(f"{where}: invalid JSON ({err.msg} at column {err.colno})")
        except RecordError as err:
            yield where, err


def _json_array(name: str, data: bytes) -> Iterator[Row]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise RecordError(
            f"{name}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column})"
        ) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(
            f"{name}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})"
        ) from None
    for i, row in enumerate(rows):
        yield f"{name}:row {i}", row


def _parquet(name: str, path: Path, gz: bool) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        source = io.BytesIO(_read_bytes(path, gz)) if gz else str(path)
        table = pq.read_table(source)
    except RecordError:
        raise
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise RecordError(
            f"{name}: not a readable parquet file ({str(err).splitlines()[0]})"
        ) from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{name}:row {i}", row


def read_file(spec: str) -> Iterator[Row]:
    """Rows of one local file; raises RecordError for missing/unsupported/unreadable files."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise RecordError(f"{spec}: file not found")
    ext, gz = file_type(path)
    if ext not in FILE_TYPES:
        raise RecordError(
            f"{spec}: unsupported file type '{ext or path.suffix}' "
            "(expected .json, .jsonl or .parquet, optionally .gz)"
        )
    if ext == ".parquet":
        yield from _parquet(spec, path, gz)
        return
    data = _read_bytes(path, gz)
    if ext == ".json" and data.lstrip()[:1] == b"[":
        yield from _json_array(spec, data)
    else:
        yield from _json_lines(spec, data)


def _hf_dataset(spec: str, split: str, subset: str | None):
    """A `datasets.Dataset`: `load_from_disk` for saved folders, else `load_dataset`."""
    import datasets

    folder = Path(spec).expanduser()
    try:
        if folder.is_dir() and (
            (folder / "state.json").exists() or (folder / "dataset_dict.json").exists()
        ):
            loaded = datasets.load_from_disk(str(folder))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(spec, subset, split=split)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RecordError(f"{spec}: cannot load dataset split '{split}' ({first})") from None


def read_rows(spec: str, split: str = "train", subset: str | None = None) -> Iterator[Row]:
    """Rows of a local file, a saved dataset folder, or a Hugging Face dataset name."""
    path = Path(spec).expanduser()
    if path.is_file() or (not path.exists() and _looks_local(spec)):
        yield from read_file(spec)
        return
    dataset = _hf_dataset(spec, split, subset)
    for i, row in enumerate(dataset):
        yield f"{spec}[{split}]:row {i}", row


def rows_name(spec: str, split: str = "train") -> str:
    """How `read_rows(spec, split)` names its source: the path, or `name[split]` for a dataset."""
    path = Path(spec).expanduser()
    if path.is_file() or (not path.exists() and _looks_local(spec)):
        return spec
    return f"{spec}[{split}]"


def _reason(message: str) -> str:
    """A row error without its location and trailing details: what kind of problem it is."""
    problem = message.split(": ", 1)[-1]
    return problem.split(" (", 1)[0] if problem.endswith(")") else problem


def no_usable_records(name: str, rows: int, errors: list[str]) -> RecordError:
    """The error for a source that yields no record: rows read and skipped, by reason."""
    if not rows:
        return RecordError(f"{name}: no usable records (0 rows read)")
    reasons: dict[str, int] = {}
    for message in errors:
        reasons[_reason(message)] = reasons.get(_reason(message), 0) + 1
    common = sorted(reasons.items(), key=lambda item: -item[1])
    listed = ", ".join(f"{n}× {reason}" for reason, n in common[:3])
    more = f", {len(common) - 3} other reasons" if len(common) > 3 else ""
    read = f"{rows} row{'s' if rows != 1 else ''} read"
    return RecordError(
        f"{name}: no usable records ({read}, {len(errors)} skipped as malformed: {listed}{more})"
    )


def memory_rows(records: list[dict]) -> Iterator[Row]:
    """Rows of an in-memory list."""
    for i, row in enumerate(records):
        yield f"records[{i}]", row


def take(rows: Iterator[Row], limit: int | None) -> Iterator[Row]:
    """The first `limit` rows (all when None)."""
    for n, row in enumerate(rows):
        if limit is not None and n >= limit:
            return
        yield row


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) index lists: a seeded random `fraction` of 0..n-1 is held out.

    At least one record is held out when `fraction` > 0 and n ≥ 2; at least one stays in train.
    Both lists keep file order.
    """
    n_val = round(n * fraction)
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    held = set(random.Random(seed).sample(range(n), n_val)) if n_val else set()
    return [i for i in range(n) if i not in held], sorted(held)
