"""Every source type (JSON, JSONL, gzip, parquet, HF datasets, in-memory) and file-level errors."""

from __future__ import annotations

import gzip
import json

import pytest

from rlhf_lightning.data.records import RecordError
from rlhf_lightning.data.sources import DataSource, read_rows, split_indices, take

ROWS = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(3)]


def jsonl_bytes(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def collect(spec, **kw):
    return [(where, raw) for where, raw in read_rows(str(spec), **kw)]


def test_jsonl_rows_carry_line_numbers_and_skip_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl_bytes(ROWS[:1]) + b"\n" + jsonl_bytes(ROWS[1:]))
    rows = collect(path)
    assert [w for w, _ in rows] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert [r for _, r in rows] == ROWS


def test_gzip_jsonl_and_json_lines_in_a_json_file(tmp_path):
    gz = tmp_path / "train.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl_bytes(ROWS)))
    assert [r for _, r in collect(gz)] == ROWS
    lines_json = tmp_path / "lines.json"
    lines_json.write_bytes(jsonl_bytes(ROWS))
    assert [w for w, _ in collect(lines_json)][-1] == f"{lines_json}:3"


def test_json_array_and_gzip_json_array_use_row_indices(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS, indent=1))
    rows = collect(path)
    assert [w for w, _ in rows] == [f"{path}:row {i}" for i in range(3)]
    assert [r for _, r in rows] == ROWS
    gz = tmp_path / "data.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    assert [r for _, r in collect(gz)] == ROWS


def test_parquet_plain_and_gzipped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    rows = collect(path)
    assert [r for _, r in rows] == ROWS
    assert rows[2][0] == f"{path}:row 2"
    gz = tmp_path / "data.parquet.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert [r for _, r in collect(gz)] == ROWS


def test_hf_saved_dataset_folder_and_data_folder(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    rows = collect(saved)
    assert [r for _, r in rows] == ROWS
    assert rows[1][0] == f"{saved}[train]:row 1"
    # DatasetDict on disk: the split is picked by name.
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]), "test": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(dd))  # fmt: skip
    assert [r for _, r in collect(dd, split="test")] == ROWS[2:]
    # A plain folder of data files goes through datasets.load_dataset(folder).
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "part.jsonl").write_bytes(jsonl_bytes(ROWS))
    assert [r for _, r in collect(folder)] == ROWS


def test_hf_name_that_cannot_load_is_one_line_error():
    with pytest.raises(RecordError) as info:
        collect("nobody-here/no-such-dataset-xyz")
    message = str(info.value)
    assert message.startswith(
        "nobody-here/no-such-dataset-xyz: cannot load dataset split 'train' ("
    )
    assert "\n" not in message


def test_limit_takes_first_rows():
    rows = iter([("a", 1), ("b", 2), ("c", 3)])
    assert list(take(rows, 2)) == [("a", 1), ("b", 2)]


# -------------------------------------------------------------------- bad files / rows
def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(RecordError, match=r"^missing/train\.jsonl: file not found$"):
        collect("missing/train.jsonl")
    csv = tmp_path / "data.csv"
    csv.write_text("prompt\nx\n")
    with pytest.raises(RecordError) as info:
        collect(csv)
    assert str(info.value) == (
        f"{csv}: unsupported file type '.csv' (expected .json, .jsonl or .parquet, optionally .gz)"
    )


def test_invalid_json_and_non_utf8_lines_are_row_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl_bytes(ROWS[:1]) + b'{"prompt": "x",\n' + b'{"prompt": "caf\xff"}\n')
    rows = collect(path)
    assert rows[0][1] == ROWS[0]
    assert isinstance(rows[1][1], RecordError)
    assert str(rows[1][1]) == f"{path}:2: invalid JSON (Expecting property name enclosed in double quotes at column 16)"  # fmt: skip
    assert str(rows[2][1]) == f"{path}:3: not valid UTF-8 (byte 0xff at column 16)"


def test_bad_json_array_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a"},\n {"prompt": "b"\n]\n')
    with pytest.raises(RecordError, match=rf"^{path}:4: invalid JSON \(Expecting ',' delimiter at column 1\)$"):  # fmt: skip
        collect(path)
    path.write_bytes(b'[\n {"prompt": "a"},\n {"prompt": "\xfe"}\n]\n')
    with pytest.raises(
        RecordError, match=rf"^{path}:3: not valid UTF-8 \(byte 0xfe at column 14\)$"
    ):
        collect(path)


def test_corrupt_gzip_and_parquet(tmp_path):
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(RecordError, match=rf"^{gz}: cannot read file \("):
        collect(gz)
    pq = tmp_path / "x.parquet"
    pq.write_bytes(b"PAR1 nonsense")
    with pytest.raises(RecordError, match=rf"^{pq}: not a readable parquet file \("):
        collect(pq)


def test_datasource_validation():
    with pytest.raises(ValueError, match="exactly one of `path` or `records`"):
        DataSource()
    with pytest.raises(ValueError, match="val_fraction"):
        DataSource(records=[], val_fraction=1.0)
    with pytest.raises(ValueError, match="on_invalid"):
        DataSource(records=[], on_invalid="ignore")


# --------------------------------------------------------------------------- split
def test_split_is_deterministic_disjoint_and_seeded():
    train, val = split_indices(100, 0.1, seed=3)
    assert (train, val) == split_indices(100, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    assert train == sorted(train) and val == sorted(val)
    assert split_indices(100, 0.1, seed=4)[1] != val


def test_split_edge_cases():
    assert split_indices(5, 0.0, 0) == ([0, 1, 2, 3, 4], [])
    assert len(split_indices(5, 0.01, 0)[1]) == 1  # a positive fraction holds out at least one
    assert split_indices(1, 0.5, 0) == ([0], [])  # never empties train
    assert len(split_indices(3, 0.9, 0)[0]) == 1


def _hh_rows(n: int) -> list[dict]:
    """n HH-style transcripts with distinct prompts (`chosen`/`rejected` strings)."""
    return [
        {
            "chosen": f"\n\nHuman: question {i}?\n\nAssistant: good answer {i}",
            "rejected": f"\n\nHuman: question {i}?\n\nAssistant: bad answer {i}",
        }
        for i in range(n)
    ]


def test_partition_parts_are_disjoint_cover_the_file_and_agree_across_kinds():
    from rlhf_lightning.data.datamodule import RLHFDataModule
    from rlhf_lightning.data.sources import Partition

    rows = _hh_rows(300)
    weights = {"proxy": 0.45, "gold": 0.45, "held_out": 0.10}

    def prompts(kind: str, keep: str, seed: int = 0) -> list[str]:
        part = Partition(parts=weights, keep=keep, seed=seed)
        source = DataSource(records=rows, val_fraction=0.0, partition=part)
        dm = RLHFDataModule(tokenizer="unused", **{f"{kind}s": source})
        return [r.prompt[-1]["content"] for r in dm.records(kind)]

    parts = {keep: prompts("preference", keep) for keep in weights}
    assert sum(len(p) for p in parts.values()) == len(rows)  # every record in exactly one part
    assert not set(parts["proxy"]) & set(parts["gold"])
    assert not set(parts["held_out"]) & (set(parts["proxy"]) | set(parts["gold"]))
    assert prompts("prompt", "held_out") == parts["held_out"]  # same rule for prompt records
    assert min(len(parts["proxy"]), len(parts["gold"])) > 3 * len(parts["held_out"]) > 0
    assert prompts("preference", "proxy", seed=1) != parts["proxy"]  # the seed matters


def test_partition_does_not_depend_on_file_order_and_limit_counts_kept_records():
    from rlhf_lightning.data.datamodule import RLHFDataModule
    from rlhf_lightning.data.sources import Partition

    rows = _hh_rows(200)
    part = Partition(parts={"a": 1.0, "b": 1.0}, keep="b", seed=3)

    def kept(records, limit=None) -> list[str]:
        source = DataSource(records=records, val_fraction=0.0, partition=part, limit=limit)
        dm = RLHFDataModule(tokenizer="unused", prompts=source)
        return [r.prompt[-1]["content"] for r in dm.records("prompt")]

    forward = kept(rows)
    assert sorted(kept(rows[::-1])) == sorted(forward)
    assert kept(rows, limit=5) == forward[:5]


def test_partition_rejects_unknown_part_and_bad_weights():
    from rlhf_lightning.data.sources import Partition

    with pytest.raises(ValueError, match="partition.keep: 'c' is not a part"):
        Partition(parts={"a": 1.0, "b": 1.0}, keep="c")
    with pytest.raises(ValueError, match="weights must be > 0"):
        Partition(parts={"a": 1.0, "b": 0.0}, keep="a")
