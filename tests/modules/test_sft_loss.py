"""SFT loss: masking on a hand-worked example; invariance to micro-batching and accumulation.

Micro-batched gradients are another float32 route to the full-batch gradient (other padding
widths, other summation order): they must be within twice the full-batch float32 error against a
float64 full-batch gradient (`within_torch_error`, tests/conftest.py).
"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch

from rlhf_lightning.data.collate import collate_demonstrations
from rlhf_lightning.data.datamodule import RLHFDataModule
from rlhf_lightning.data.sources import DataSource
from rlhf_lightning.data.templates import Tokenizing, TokenStats
from rlhf_lightning.models.loading import ModelSpec, load_causal_lm
from rlhf_lightning.modules.common import OptimConfig
from rlhf_lightning.modules.sft import SFTModule, SFTSampleConfig, sft_loss_sum

LN2 = math.log(2.0)


def test_loss_masking_hand_worked():
    # Row 0: prompt a b, response c d  -> positions 1 and 2 predict c and d.
    # Row 1: prompt a, response e, then right padding -> position 0 predicts e.
    a, b, c, d, e, pad = 0, 1, 1, 0, 2, 0
    labels = torch.tensor([[-100, -100, c, d], [-100, e, -100, -100]])  # [B, T]
    logits = torch.full((2, 4, 3), 50.0)  # [B, T, V]; masked positions are wildly wrong
    logits[0, 1] = torch.log(torch.tensor([1.0, 2.0, 1.0]))  # p(c=1) = 1/2 -> nll ln 2
    logits[0, 2] = torch.log(torch.tensor([1.0, 1.0, 2.0]))  # p(d=0) = 1/4 -> nll 2 ln 2
    logits[1, 0] = torch.log(torch.tensor([1.0, 1.0, 2.0]))  # p(e=2) = 1/2 -> nll ln 2
    logits[0, 0, 1] = -50.0  # would be a huge loss if the prompt position counted
    nll_sum, n_tokens = sft_loss_sum(logits, labels)
    assert n_tokens.item() == 3
    assert nll_sum.item() == pytest.approx(4 * LN2, rel=1e-6)
    assert (nll_sum / n_tokens).item() == pytest.approx(4 * LN2 / 3, rel=1e-6)
    del a, b, pad


RECORDS = [
    {"prompt": "write a short review of the film", "response": "fine"},
    {"prompt": "hello", "response": "the movie was great and the acting was wonderful ."},
    {"prompt": "the plot", "response": "boring , the ending was terrible !"},
    {"prompt": "a b c d e f g h", "response": "yes no good bad"},
]


class _GradCapture(pl.Callback):
    """Gradients after the first optimizer step (before any further zero_grad)."""

    def __init__(self):
        self.grads = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1 and self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()}


def _fit_grads(tokenizer, base, tmp_path, batch_size, accumulate) -> dict:
    dm = RLHFDataModule(
        tokenizer=tokenizer,
        demonstrations=DataSource(records=RECORDS, val_fraction=0.0),
        batch_size=batch_size,
        max_length=64,
    )
    module = SFTModule(
        ModelSpec(config={"model_type": "llama"}),
        optim=OptimConfig(lr=1e-3, total_steps=10),
        samples=SFTSampleConfig(every_n_steps=0),
        export_dir=str(tmp_path / f"export_{batch_size}"),
    )
    module.model = copy.deepcopy(base)
    capture = _GradCapture()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[capture],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    return capture.grads


def _manual_grads(model, batch) -> dict:
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll_sum, n_tokens = sft_loss_sum(logits, batch["labels"])  # [B, T, V] -> scalars
    (nll_sum / n_tokens).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_gradient_invariant_to_micro_batching(
    tiny_tokenizer, tiny_config, tmp_path, within_torch_error
):
    base = load_causal_lm(ModelSpec(config=tiny_config(len(tiny_tokenizer))))
    tokenizing = Tokenizing(tiny_tokenizer, 64, 32)
    from rlhf_lightning.data.records import parse_record

    records = [parse_record(r, "demonstration", f"mem:{i}") for i, r in enumerate(RECORDS)]
    examples = tokenizing.demonstrations(records, TokenStats())
    pad = tiny_tokenizer.pad_token_id
    full_batch = collate_demonstrations(examples, pad)
    reference = _manual_grads(copy.deepcopy(base), full_batch)
    exact = _manual_grads(copy.deepcopy(base).double(), full_batch)  # float64

    # Averaging per-micro-batch means would give a different gradient on this data.
    naive = {}
    for example in examples:
        grads = _manual_grads(copy.deepcopy(base), collate_demonstrations([example], pad))
        for name, grad in grads.items():
            naive[name] = naive.get(name, 0) + grad / len(examples)
    gap = max((naive[n] - reference[n]).abs().max().item() for n in reference)
    assert gap > 1e-3

    for batch_size, accumulate in [(4, 1), (2, 2), (1, 4)]:
        grads = _fit_grads(tiny_tokenizer, base, tmp_path, batch_size, accumulate)
        for name, ref in reference.items():
            within_torch_error(
                grads[name], ref, exact[name], name=f"{batch_size}x{accumulate} {name}"
            )
