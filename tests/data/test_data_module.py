"""RLHFDataModule: templates, truncation policy and its counts, splits, dataloaders, Trainer use."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from rlhf_lightning.data import DataSource, RecordError
from rlhf_lightning.data.datamodule import RLHFDataModule
from rlhf_lightning.data.templates import render_plain, render_prompt


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def demos(n):
    words = "a b c d e f g h i j k l m n o p q r s t".split()
    return [
        {"prompt": f"{words[i % 20]} {words[(i + 1) % 20]}", "response": "yes no"} for i in range(n)
    ]


def make_dm(tok, **kw):
    kw.setdefault("max_length", 64)
    kw.setdefault("max_prompt_length", 32)
    return RLHFDataModule(tok, **kw)


def test_plain_template_is_documented_format(tiny_tokenizer):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert render_plain(messages) == "System: s\n\nUser: u\n\nAssistant:"
    assert render_prompt(tiny_tokenizer, messages) == render_plain(messages)


def test_sft_rows_with_chat_template(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    dm = make_dm(tok, demonstrations=DataSource(records=[{"prompt": "the movie", "response": "was great"}], val_fraction=0))  # fmt: skip
    batch = next(iter(dm.dataloader("demonstration")))
    prompt = ids(tok, "user : the movie \nassistant :")
    response = ids(tok, "was great") + [tok.eos_token_id]
    assert batch["input_ids"].tolist() == [prompt + response]
    assert batch["labels"].tolist() == [[-100] * len(prompt) + response]
    assert batch["attention_mask"].tolist() == [[1] * (len(prompt) + len(response))]


def test_truncation_keeps_response_left_truncates_prompt_and_counts_skips(tiny_tokenizer):
    tok = tiny_tokenizer
    records = [
        {"prompt": "a b c d e f g h", "response": "yes no"},  # prompt 12 tokens → cut to 5
        {"prompt": "a", "response": "yes"},  # fits
        {"prompt": "a", "response": "a b c d e f g h"},  # 8 + EOS leaves no prompt room → skip
    ]
    dm = make_dm(tok, demonstrations=DataSource(records=records, val_fraction=0), max_length=8, max_prompt_length=6)  # fmt: skip
    with pytest.warns(UserWarning, match=r"demonstration/train: 1 of 3 prompts left-truncated .* 1 records skipped"):  # fmt: skip
        batch = next(iter(dm.dataloader("demonstration", shuffle=False)))
    eos = tok.eos_token_id
    full_prompt = tok(render_plain([{"role": "user", "content": "a b c d e f g h"}]))["input_ids"]
    first = full_prompt[-5:] + ids(tok, "yes no") + [eos]
    assert full_prompt[-5:] == ids(tok, "f g h") + ids(tok, "Assistant:")  # oldest tokens dropped
    assert batch["input_ids"][0].tolist() == first
    assert batch["labels"][0].tolist() == [-100] * 5 + ids(tok, "yes no") + [eos]
    assert batch["input_ids"].shape == (2, 8)
    assert dm.stats["demonstration"]["train"] == {
        "records": 3,
        "truncated": 1,
        "skipped": 1,
        "used": 2,
    }


def test_preference_group_shares_one_prompt_cut_for_all_responses(tiny_tokenizer):
    tok = tiny_tokenizer
    records = [
        {"prompt": "a b c d", "chosen": "yes", "rejected": "no no no"},
        {"prompt": "x", "responses": ["good", "bad bad", "hello"], "margin": 0.5},
    ]
    dm = make_dm(tok, preferences=DataSource(records=records, val_fraction=0), max_length=9)
    batch = next(iter(dm.dataloader("preference", shuffle=False)))
    assert batch["group"].tolist() == [0, 0, 1, 1, 1]
    assert batch["rank"].tolist() == [0, 1, 0, 1, 2]
    assert batch["margin"].tolist() == [0.0, 0.5]
    assert batch["num_groups"] == 2
    # First group: longest response "no no no"+EOS = 4 tokens → prompt budget 5 for both rows.
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[:2] == [5 + 2, 5 + 4]
    assert batch["input_ids"][0, :5].tolist() == batch["input_ids"][1, :5].tolist()
    assert dm.stats["preference"]["train"]["truncated"] == 1


def test_prompt_batches_left_padded_with_rendered_text(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    records = [{"prompt": "hello"}, {"prompt": "the movie was great"}]
    dm = make_dm(tok, prompts=DataSource(records=records, val_fraction=0))
    batch = next(iter(dm.dataloader("prompt", shuffle=False)))
    assert batch["prompt_text"] == [
        "user : hello \nassistant :",
        "user : the movie was great \nassistant :",
    ]
    short = ids(tok, batch["prompt_text"][0])
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"][0].tolist() == [tok.pad_token_id] * (width - len(short)) + short
    assert batch["attention_mask"][0].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert batch["prompt_messages"][1] == [{"role": "user", "content": "the movie was great"}]


def test_fraction_split_deterministic_under_seed(tiny_tokenizer):
    def val_prompts(seed):
        dm = make_dm(tiny_tokenizer, seed=seed, demonstrations=DataSource(records=demos(20), val_fraction=0.25))  # fmt: skip
        return [r.prompt for r in dm.records("demonstration", "val")], len(
            dm.records("demonstration")
        )

    first, n_train = val_prompts(1)
    assert len(first) == 5 and n_train == 15
    assert val_prompts(1)[0] == first
    assert val_prompts(2)[0] != first


def test_separate_validation_file_and_hf_val_split(tiny_tokenizer, tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.json"
    train.write_text("".join(json.dumps(r) + "\n" for r in demos(4)))
    val.write_text(json.dumps(demos(2)))
    dm = make_dm(tiny_tokenizer, demonstrations=DataSource(path=str(train), val_path=str(val)))
    assert len(dm.records("demonstration", "train")) == 4
    assert len(dm.records("demonstration", "val")) == 2

    import datasets

    folder = tmp_path / "dd"
    splits = {
        "train": datasets.Dataset.from_list(demos(3)),
        "test": datasets.Dataset.from_list(demos(1)),
    }
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    dm = make_dm(tiny_tokenizer, prompts=DataSource(path=str(folder), val_split="test"))
    assert [len(dm.records("prompt", s)) for s in ("train", "val")] == [3, 1]


def test_train_order_shuffled_deterministically(tiny_tokenizer):
    def first_batch():
        dm = make_dm(tiny_tokenizer, batch_size=20, demonstrations=DataSource(records=demos(20), val_fraction=0))  # fmt: skip
        return next(iter(dm.dataloader("demonstration")))["input_ids"]

    a, b = first_batch(), first_batch()
    assert torch.equal(a, b)
    dm = make_dm(tiny_tokenizer, batch_size=20, demonstrations=DataSource(records=demos(20), val_fraction=0))  # fmt: skip
    ordered = next(iter(dm.dataloader("demonstration", shuffle=False)))["input_ids"]
    assert not torch.equal(a, ordered) and sorted(map(tuple, a.tolist())) == sorted(map(tuple, ordered.tolist()))  # fmt: skip


def test_malformed_rows_raise_by_default_and_are_counted_when_skipped(tiny_tokenizer, tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    path.write_text(
        json.dumps(good) + "\n" + json.dumps({"prompt": "a", "chosen": "b"}) + "\n{oops\n"
    )
    dm = make_dm(tiny_tokenizer, preferences=DataSource(path=str(path)))
    with pytest.raises(RecordError) as info:
        dm.setup()
    assert str(info.value) == f"{path}:2: field 'rejected' is missing"
    dm = make_dm(tiny_tokenizer, preferences=DataSource(path=str(path), on_invalid="skip", val_fraction=0))  # fmt: skip
    with pytest.warns(UserWarning, match=r"preference: skipped 2 of 3 malformed rows, e.g. .*prefs.jsonl:2: field 'rejected' is missing; .*prefs.jsonl:3: invalid JSON"):  # fmt: skip
        assert len(dm.records("preference")) == 1
    assert dm.stats["preference"]["read"] == {"rows": 3, "invalid": 2}


def test_parquet_row_error_through_datamodule(tiny_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prefs.parquet"
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "a", "chosen": None, "rejected": "c"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    dm = make_dm(tiny_tokenizer, preferences=DataSource(path=str(path)))
    with pytest.raises(RecordError, match=rf"^{path}:row 1: field 'chosen' is missing$"):
        dm.setup()


def test_failing_chat_template_is_one_line_error(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    dm = make_dm(tok, prompts=DataSource(records=[{"prompt": "a"}], val_fraction=0))
    with pytest.raises(RecordError) as info:
        dm.dataset("prompt")
    assert (
        str(info.value)
        == "record 0 (roles user): the tokenizer's chat template failed: roles must alternate"
    )


def test_tokenizer_from_saved_folder_gets_pad_token(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    dm = RLHFDataModule(str(tmp_path / "tok"), prompts=DataSource(records=[{"prompt": "a"}]))
    assert dm.tokenizer.pad_token == dm.tokenizer.eos_token
    assert dm.tokenizer is dm.tokenizer  # loaded once


def test_missing_source_and_unknown_kind_errors(tiny_tokenizer):
    dm = make_dm(tiny_tokenizer, prompts=DataSource(records=[{"prompt": "a"}]))
    with pytest.raises(
        ValueError, match=r"no data source for kind 'preference': set `data.preferences`"
    ):
        dm.dataloader("preference")
    with pytest.raises(ValueError, match="unknown data kind 'sft'"):
        dm.records("sft")
    with pytest.raises(RuntimeError, match="needs a Trainer"):
        dm.train_dataloader()


def test_val_dataloader_empty_when_no_validation_records(tiny_tokenizer):
    dm = make_dm(tiny_tokenizer, prompts=DataSource(records=[{"prompt": "a"}] * 3, val_fraction=0))
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(data_kind="prompt"))
    assert dm.val_dataloader() == []
    assert len(dm.train_dataloader().dataset) == 3


class _Probe(pl.LightningModule):
    """Minimal module: records the batches it is given."""

    data_kind = "demonstration"

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, _):
        self.seen.append(("train", tuple(batch["input_ids"].shape), batch["labels"].min().item()))
        return self.w * batch["attention_mask"].float().mean()

    def validation_step(self, batch, _):
        self.seen.append(("val", tuple(batch["input_ids"].shape), batch["labels"].min().item()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("val_fraction", [0.2, 0.0])
def test_dataloaders_follow_the_attached_modules_data_kind(tiny_tokenizer, val_fraction):
    source = DataSource(records=demos(10), val_fraction=val_fraction)
    dm = make_dm(tiny_tokenizer, batch_size=4, eval_batch_size=2, demonstrations=source)
    module = _Probe()
    trainer = pl.Trainer(
        max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", val_check_interval=2,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    phases = ["train", "train", "val"] if val_fraction else ["train", "train"]
    assert [s[0] for s in module.seen] == phases
    assert module.seen[0][1][0] == 4 and module.seen[-1][1][0] == (2 if val_fraction else 4)
    assert all(s[2] == -100 for s in module.seen)


def test_unloadable_tokenizer_is_one_line_error(tmp_path):
    dm = RLHFDataModule(str(tmp_path / "no-such-tokenizer"))
    with pytest.raises(
        RecordError, match=r"^data field 'tokenizer': cannot load '.*no-such-tokenizer'"
    ):
        dm.tokenizer  # noqa: B018
