"""Sources that leave no usable record stop at setup with "no usable records", naming the source.

Covers every data kind, both splits, files, Hugging Face datasets and in-memory lists, and the
two ways rows disappear: malformed under `on_invalid: skip`, and too long to tokenise.
"""

from __future__ import annotations

import json

import pytest

from rlhf_lightning.data import DataSource, RecordError
from rlhf_lightning.data.datamodule import RLHFDataModule


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def no_records_error(dm: RLHFDataModule, kind: str | None = None, split: str = "train") -> str:
    with pytest.raises(RecordError) as info:
        dm.setup() if kind is None else dm.dataset(kind, split)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("source_arg", ["demonstrations", "preferences", "prompts"])
def test_empty_file_of_every_kind(tiny_tokenizer, tmp_path, source_arg):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")  # blank lines are not rows
    dm = RLHFDataModule(tiny_tokenizer, **{source_arg: DataSource(path=str(path))})
    assert no_records_error(dm) == f"{path}: no usable records (0 rows read)"


def test_every_row_skipped_lists_counts_by_reason(tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        {"prompt": "b", "responses": ["x", "x", "y"]},
        {"prompt": "c", "chosen": "yes", "rejected": "yes "},
        {"prompt": "d", "chosen": "yes"},
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    dm = RLHFDataModule(tiny_tokenizer, preferences=DataSource(path=path, on_invalid="skip"))
    assert no_records_error(dm) == (
        f"{path}: no usable records (4 rows read, 4 skipped as malformed: "
        "2× field 'rejected' is identical to 'chosen', "
        "1× field 'responses[1]' is identical to 'responses[0]', 1× field 'rejected' is missing)"
    )


def test_empty_validation_file_is_named_even_when_train_is_fine(tiny_tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "response": "b"}])
    val = tmp_path / "val.jsonl"
    val.write_text("")
    source = DataSource(path=train, val_path=str(val))
    dm = RLHFDataModule(tiny_tokenizer, demonstrations=source)
    assert no_records_error(dm) == f"{val}: no usable records (0 rows read)"


def test_in_memory_list_and_limit_zero(tiny_tokenizer, tmp_path):
    dm = RLHFDataModule(tiny_tokenizer, prompts=DataSource(records=[]))
    assert no_records_error(dm) == "data.prompts.records: no usable records (0 rows read)"
    bad = DataSource(records=[{"prompt": ""}, {"text": "x"}], on_invalid="skip")
    message = no_records_error(RLHFDataModule(tiny_tokenizer, prompts=bad))
    assert message.startswith("data.prompts.records: no usable records (2 rows read, 2 skipped ")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    dm = RLHFDataModule(tiny_tokenizer, prompts=DataSource(path=path, limit=0))
    assert no_records_error(dm) == f"{path}: no usable records (0 rows read)"


def test_hf_dataset_split_is_named_with_its_split(tiny_tokenizer, tmp_path):
    import datasets

    folder = tmp_path / "dd"
    splits = {
        "train": datasets.Dataset.from_list([{"prompt": "a", "response": "b"}]),
        "test": datasets.Dataset.from_list([{"prompt": "a", "response": " "}]),
    }
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    source = DataSource(path=str(folder), val_split="test", on_invalid="skip")
    dm = RLHFDataModule(tiny_tokenizer, demonstrations=source)
    assert no_records_error(dm) == (
        f"{folder}[test]: no usable records (1 row read, 1 skipped as malformed: "
        "1× field 'response' is an empty response)"
    )


def test_every_record_too_long_stops_when_the_split_is_built(tiny_tokenizer):
    long = {"prompt": "a", "response": "a b c d e f g h"}  # 8 tokens + EOS > max_length 8
    source = DataSource(records=[long, long, long], val_fraction=0.34)
    dm = RLHFDataModule(tiny_tokenizer, demonstrations=source, max_length=8, max_prompt_length=4)
    dm.setup()  # parsing is fine; tokenising leaves nothing
    for split, name, n in [
        ("train", "data.demonstrations.records", "2 records"),
        ("val", "data.demonstrations.records (val_fraction split)", "1 record"),
    ]:
        with pytest.warns(UserWarning, match="records skipped because"):
            message = no_records_error(dm, "demonstration", split)
        assert message == (
            f"{name}: no usable records ({n}, all skipped: their responses alone + EOS "
            "leave no room for a prompt token within max_length=8)"
        )
