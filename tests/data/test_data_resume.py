"""Mid-epoch resume: the batches after a restore equal those of an uninterrupted run (the
training loader, and `EpochBatches` for PPO-ptx)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from rlhf_lightning.data import DataSource
from rlhf_lightning.data.datamodule import RLHFDataModule
from rlhf_lightning.data.sampling import EpochBatches, EpochShuffleSampler


class _Recorder(pl.LightningModule):
    """Records each training batch's token ids; draws global randomness like a sampler would."""

    data_kind = "demonstration"

    def __init__(self, schedule_from_trainer: bool = False):
        super().__init__()
        self.schedule_from_trainer = schedule_from_trainer
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[list[int]]] = []

    def training_step(self, batch, _):
        self.seen.append(batch["input_ids"].tolist())
        torch.rand(7)  # global RNG use must not change the data order
        return self.w * batch["attention_mask"].float().mean()

    def configure_optimizers(self):
        if self.schedule_from_trainer:
            # What `trainer.estimated_stepping_batches` does without max_steps: it builds the
            # train loader before Lightning has read the loop state from the checkpoint.
            self.trainer.fit_loop.setup_data()
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tokenizer, max_steps, tmp_path, ckpt_path=None, save_every=None, early_loader=False):
    words = "a b c d e f g h i j k l m n o p q r s t".split()
    records = [
        {"prompt": f"{words[i]} {words[(i * 7) % 20]}", "response": "yes"} for i in range(20)
    ]
    dm = RLHFDataModule(
        tokenizer, demonstrations=DataSource(records=records, val_fraction=0.0), batch_size=3
    )
    callbacks = []
    if save_every:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=tmp_path, every_n_train_steps=save_every, save_top_k=-1, filename="{step}"
            )
        )
    trainer = pl.Trainer(
        max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", callbacks=callbacks,
        enable_checkpointing=bool(save_every), limit_val_batches=0,
    )  # fmt: skip
    module = _Recorder(schedule_from_trainer=early_loader)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize(
    "early_loader,save_at", [(False, 4), (True, 4), (False, 7)], ids=["mid", "early", "epoch_end"]
)
def test_resume_sees_the_same_batches(tiny_tokenizer, tmp_path, early_loader, save_at):
    # 20 records / batch 3 = 7 batches per epoch: step 9 crosses into the second epoch.
    straight = _fit(tiny_tokenizer, 9, tmp_path / "a", early_loader=early_loader)
    first = _fit(
        tiny_tokenizer, save_at, tmp_path / "b", save_every=save_at, early_loader=early_loader
    )
    ckpt = str(tmp_path / "b" / f"step={save_at}.ckpt")
    resumed = _fit(tiny_tokenizer, 9, tmp_path / "c", ckpt_path=ckpt, early_loader=early_loader)
    assert first == straight[:save_at]
    assert resumed == straight[save_at:]
    assert straight[:7] != straight[7:] + straight[:2]  # epochs are shuffled differently


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(10, seed=3), EpochShuffleSampler(10, seed=3)
    torch.rand(5)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b) and sorted(a) == list(range(10))
    b.set_epoch(1)
    b.skip_next(4)
    assert list(b) == list(a)[4:]
    assert len(list(b)) == 10  # the skip applies to one iteration only


def _old_ptx_batches(data, size: int, seed: int, pos: dict):
    """PPO-ptx's former generator (`PPOModule._ptx_batches`), batches as index lists."""
    while True:
        order = torch.randperm(
            len(data), generator=torch.Generator().manual_seed(seed + pos["epoch"])
        )
        order = order.tolist()
        starts = list(range(0, len(order) - size + 1, size)) or [0]
        for start in starts[pos["consumed"] :]:
            pos["consumed"] += 1
            yield [data[i] for i in order[start : start + size]]
        pos.update(epoch=pos["epoch"] + 1, consumed=0)


@pytest.mark.parametrize("n,size", [(3, 5), (5, 5), (11, 4)], ids=["short", "equal", "longer"])
def test_epoch_batches_follow_the_old_ptx_order_and_resume(n, size):
    data = list(range(100, 100 + n))
    old_pos = {"epoch": 0, "consumed": 0}
    old = _old_ptx_batches(data, size, 7, old_pos)
    new = EpochBatches(data, list, size, seed=7)
    for _ in range(9):  # several epochs
        torch.rand(3)  # global RNG use must not change the order
        assert next(new) == next(old)
        assert new.state_dict() == old_pos
    resumed = EpochBatches(data, list, size, seed=7, position=new.state_dict())
    assert [next(resumed) for _ in range(5)] == [next(new) for _ in range(5)]
    sampler = EpochShuffleSampler(n, seed=7)
    sampler.set_epoch(0)
    first = EpochBatches(data, list, size, seed=7)
    assert next(first) == [data[i] for i in sampler.order().tolist()[:size]]
