"""RewardModule end to end on a tiny Llama: scoring under padding, training, export round trip.

Scores reached by two float32 routes (padded vs alone, module vs reloaded export, other padding
widths) are judged against a float64 forward: the route under test within twice the other
route's error (`within_torch_error`, tests/conftest.py).
"""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_lightning.data.datamodule import RLHFDataModule
from rlhf_lightning.data.sources import DataSource
from rlhf_lightning.models.loading import ModelSpec, load_sequence_classifier
from rlhf_lightning.models.reward_export import STATS_FILE, load_reward_model, score_rows
from rlhf_lightning.modules.common import OptimConfig
from rlhf_lightning.modules.reward import RewardExportConfig, RewardModule
from rlhf_lightning.modules.reward_losses import RewardLossConfig

PROMPTS = list("abcdefghijklmnopqrstuvwxyz")


def _pairs(n: int) -> list[dict]:
    """Separable toy preferences: 'great' beats 'terrible'."""
    return [
        {
            "prompt": f"write a short review of the film {PROMPTS[i % 26]} ?",
            "chosen": "the movie was great",
            "rejected": "the movie was terrible",
        }
        for i in range(n)
    ]


def _pad_eos(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    return tok


def _fit(tmp_path, tokenizer, tiny_config, records, steps: int, **module_kwargs):
    dm = RLHFDataModule(
        tokenizer=tokenizer,
        preferences=DataSource(records=records, val_fraction=0.25),
        max_length=64,
        batch_size=4,
    )
    module = RewardModule(
        model_spec=ModelSpec(config=tiny_config(len(tokenizer))),
        optim=OptimConfig(lr=3e-3, warmup_steps=0),
        export_dir=str(tmp_path / "export"),
        **module_kwargs,
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
    )
    trainer.fit(module, datamodule=dm)
    return trainer, module, dm


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_score_reads_last_real_token_under_any_padding(
    tiny_tokenizer, tiny_config, pad_is_eos, within_torch_error
):
    tok = _pad_eos(tiny_tokenizer) if pad_is_eos else tiny_tokenizer
    model = load_sequence_classifier(ModelSpec(config=tiny_config(len(tok)))).eval()
    ids = tok("the movie was great", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    short = ids[:3]
    model64 = copy.deepcopy(model).double()
    alone, alone64 = (
        [
            score_rows(m, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
            for r in (ids, short)
        ]
        for m in (model, model64)
    )
    pad = tok.pad_token_id
    width = len(ids)
    right = torch.tensor([ids, short + [pad] * (width - 3)])  # [2, T]
    left = torch.tensor([ids, [pad] * (width - 3) + short])  # [2, T]
    right_mask = (torch.arange(width) < torch.tensor([[width], [3]])).long()  # [2, T]
    left_mask = (torch.arange(width) >= torch.tensor([[0], [width - 3]])).long()  # [2, T]
    with torch.no_grad():
        got_right = score_rows(model, right, right_mask)
        got_left = score_rows(model, left, left_mask)
    expected = torch.cat(alone).detach()
    exact = torch.cat(alone64).detach()
    within_torch_error(got_right, expected, exact, name="right padded")
    within_torch_error(got_left, expected, exact, name="left padded")
    # the full row ends with EOS (== pad when pad_is_eos): its score is the EOS position's,
    # not the token before it
    assert not torch.allclose(expected[0], alone[1][0])


def test_reward_module_learns_and_exports(
    tmp_path, tiny_tokenizer, tiny_config, within_torch_error
):
    tok = _pad_eos(tiny_tokenizer)  # the hard case: pad == eos
    trainer, module, dm = _fit(
        tmp_path, tok, tiny_config, _pairs(32), steps=24, loss=RewardLossConfig(center_coef=0.01)
    )
    metrics = trainer.callback_metrics
    assert metrics["reward/val/accuracy"].item() == 1.0
    assert metrics["reward/val/margin"].item() > 0
    assert {"reward/val/chosen_mean", "reward/val/rejected_std"} <= set(metrics)

    export = tmp_path / "export"
    stats = json.loads((export / STATS_FILE).read_text())
    assert stats["count"] == len(dm.records("preference", "train"))
    assert stats["std"] >= 0 and stats["all_count"] == 2 * stats["count"]

    # plain transformers reload: pad token distinct from EOS, same scores as the module
    plain = AutoModelForSequenceClassification.from_pretrained(export).eval()
    plain_tok = AutoTokenizer.from_pretrained(export)
    assert plain.config.num_labels == 1
    assert plain.config.pad_token_id == plain_tok.pad_token_id != plain_tok.eos_token_id
    batch = next(iter(dm.dataloader("preference", "val", shuffle=False)))
    module.eval()
    with torch.no_grad():
        ours = module(batch["input_ids"], batch["attention_mask"])  # [R]
        ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, plain_tok.pad_token_id)
        theirs = plain(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, 0]
        plain64 = copy.deepcopy(plain).double()
        exact = plain64(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, 0]
    within_torch_error(theirs, ours, exact, name="reloaded export")
    # and via texts padded by the exported tokenizer itself
    texts = [tok.decode(r[m.bool()]) for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    enc = plain_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        from_text = plain(**enc).logits[:, 0]
    within_torch_error(from_text, ours, exact, name="export's own padding")

    model, loaded_tok, loaded_stats = load_reward_model(export)
    assert loaded_stats == stats and not any(p.requires_grad for p in model.parameters())


def test_reward_module_kwise_batches_and_val_table(tmp_path, tiny_tokenizer, tiny_config):
    records = [
        {
            "prompt": f"write a short review of the film {c} ?",
            "responses": ["the movie was great", "the movie was fine", "the movie was terrible"],
        }
        for c in PROMPTS[:16]
    ]
    trainer, module, _ = _fit(
        tmp_path,
        tiny_tokenizer,
        tiny_config,
        records,
        steps=4,
        export=RewardExportConfig(enabled=False),
    )
    assert 0.0 <= trainer.callback_metrics["reward/val/accuracy"].item() <= 1.0
    assert not (tmp_path / "export").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0}).Reload()
    tags = events.Tags()
    assert "reward/val/worst_pairs/text_summary" in tags["tensors"]
    assert "reward/val/chosen_rewards" in tags["histograms"]
    assert "reward/perf/pairs_per_s" in tags["scalars"]
