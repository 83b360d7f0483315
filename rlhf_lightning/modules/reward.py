"""RewardModule: reward-model training (step 2 of RLHF) on pairwise or K-wise rankings.

A scalar head on a causal-LM / sequence-classification backbone scores every response of
every prompt in ONE forward over the stacked batch (`kind="preference"`, see docs/data.md:
`input_ids [R, T]`, `group [R]`, `rank [R]`, `margin [G]`). The score is read at the last
attended token (padding side and pad id do not matter). Loss: InstructGPT's K-wise loss
(Ouyang et al. 2022, eq. 1) — Bradley–Terry over all C(K,2) pairs of a prompt, averaged
per prompt — which is plain Bradley–Terry for pairs, with an optional per-record margin
(Touvron et al. 2023) and an optional reward-centering term (Eisenstein et al. 2023).
At the end of `fit` the model is exported for `AutoModelForSequenceClassification`
with `reward_stats.json` (see `rlhf_lightning.models.reward_export`).

TensorBoard tags: `reward/train/*`, `reward/val/*` (accuracy, margin, chosen/rejected
mean and std, histograms), `reward/val/worst_pairs` (text table), `reward/perf/*`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from rlhf_lightning.models.loading import ModelSpec, load_sequence_classifier
from rlhf_lightning.models.reward_export import export_reward_model, score_rows
from rlhf_lightning.modules.base import StageModule, coerce_config
from rlhf_lightning.modules.common import OptimConfig, lightning_optimizers, log_text_table
from rlhf_lightning.modules.reward_losses import RewardLossConfig, reward_model_loss
from rlhf_lightning.modules.reward_metrics import PairwiseAccuracy, RewardMoments
from rlhf_lightning.modules.reward_packing import (
    PackingConfig,
    packing_is_exact,
    score_rows_packed,
)
from rlhf_lightning.ppo.varlen import gradient_checkpointing


@dataclass
class RewardLogConfig:
    """Reward histograms and the validation table of the pairs ranked most wrongly."""

    histogram_every_n_steps: int = 50
    """Log reward histograms of training batches this often (0 disables; validation histograms
    are logged every validation epoch)."""
    worst_pairs: int = 8
    """Rows in the validation table `reward/val/worst_pairs`; 0 disables the table."""
    table_chars: int = 300
    """Characters of each text kept in that table."""


@dataclass
class RewardExportConfig:
    """The export written when fit ends: model, tokenizer and `reward_stats.json`."""

    enabled: bool = True
    """Export the model, tokenizer and `reward_stats.json` when fit ends."""
    stats_max_batches: int | None = None
    """Cap on training batches scored for `reward_stats.json` (null = the whole training split)."""


class RewardModule(StageModule):
    """Trains a scalar reward model on ranked responses and exports it at the end of fit."""

    data_kind = "preference"

    def __init__(
        self,
        model_spec: ModelSpec,
        optim: OptimConfig | None = None,
        loss: RewardLossConfig | None = None,
        packing: PackingConfig | None = None,
        logging: RewardLogConfig | None = None,
        export: RewardExportConfig | None = None,
        export_dir: str | None = None,
    ) -> None:
        """Build the module; the network itself is created in `configure_model`.

        Args:
            model_spec: Backbone to load: hub id / local dir (e.g. the SFT export), GGUF file or a
                config dict. A causal-LM checkpoint gets a fresh scalar head (`num_labels=1`).
            optim: Optimiser and warmup+cosine schedule (`OptimConfig`); defaults when None.
            loss: Margin and reward-centering options of the K-wise loss (`RewardLossConfig`).
            packing: Packed scoring of each batch (`PackingConfig`).
            logging: Histograms and the worst-pairs table (`RewardLogConfig`).
            export: Whether and how to export at the end of fit (`RewardExportConfig`).
            export_dir: Where to export; null = `<log_dir>/export`.
        """
        super().__init__()
        self.model_spec = coerce_config(ModelSpec, model_spec)
        self.optim = coerce_config(OptimConfig, optim)
        self.loss_cfg = coerce_config(RewardLossConfig, loss)
        self.packing_cfg = coerce_config(PackingConfig, packing)
        self.logging_cfg = coerce_config(RewardLogConfig, logging)
        self.export_cfg = coerce_config(RewardExportConfig, export)
        self.export_dir = export_dir
        if self.loss_cfg.center_coef < 0:
            raise ValueError(
                f"model.loss.center_coef: must be >= 0, got {self.loss_cfg.center_coef}"
            )
        self.save_plain_hparams()
        self._packed_ok = False
        self._per_group = False
        self.model = None
        self.train_acc = PairwiseAccuracy()
        self.val_acc = PairwiseAccuracy()
        self.val_margin = MeanMetric()
        self.val_chosen = RewardMoments()
        self.val_rejected = RewardMoments()
        self._val_rewards: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
        self._worst: list[dict] = []
        self._step_start = 0.0

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        tokenizer = self.tokenizer
        self.model = load_sequence_classifier(
            self.model_spec,
            vocab_size=len(tokenizer),
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
        )
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes
        if self.packing_cfg.enabled:
            self._packed_ok = packing_is_exact(self.model, len(tokenizer))
            if not self._packed_ok:
                rank_zero_warn(
                    f"model.packing.enabled: {type(self.model).__name__} does not support packed scoring; "
                    "using padded rows"
                )
            self._per_group = (
                self._packed_ok
                and self.packing_cfg.attention_per_group
                and not gradient_checkpointing(self.model)
                and packing_is_exact(self.model, len(tokenizer), per_group=True)
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards `Float[R]` for rows `input_ids [R, T]`, read at the last attended token."""
        return score_rows(self.model, input_ids, attention_mask)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return lightning_optimizers(params, self.optim, self.trainer)

    # ------------------------------------------------------------------ steps
    def score_batch(self, batch: dict) -> torch.Tensor:
        """Rewards `Float[R]` of a stacked preference batch (packed when enabled)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]  # [R, T]
        if self._packed_ok and int(mask.sum()) <= self.packing_cfg.max_tokens:
            return score_rows_packed(
                self.model,
                ids,
                mask,
                batch["group"],
                int(batch["num_groups"]),
                per_group=self._per_group,
            )
        return self(ids, mask)

    def _shared_step(self, batch: dict):
        rewards = self.score_batch(batch)  # [R]
        margin = batch.get("margin") if self.loss_cfg.use_margin else None  # [G]
        loss, parts = reward_model_loss(
            rewards,
            batch["group"],
            batch["rank"],
            int(batch["num_groups"]),
            margin=margin,
            center_coef=self.loss_cfg.center_coef,
        )
        return rewards, loss, parts

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        rewards, loss, parts = self._shared_step(batch)
        best = batch["rank"] == 0  # [R]
        groups = int(batch["num_groups"])
        batch_acc = self.train_acc(parts["diff"])  # this batch's pairs (also accumulated)
        log = dict(on_step=True, on_epoch=False, batch_size=groups)
        self.log("reward/train/loss", loss, prog_bar=True, **log)
        self.log("reward/train/ranking_loss", parts["ranking"], **log)
        if "centering" in parts:
            self.log("reward/train/centering_loss", parts["centering"], **log)
        self.log("reward/train/accuracy", batch_acc, **log)
        self.log("reward/train/margin", parts["diff"].mean(), **log)
        self.log("reward/train/chosen_mean", rewards[best].detach().mean(), **log)
        self.log("reward/train/rejected_mean", rewards[~best].detach().mean(), **log)
        every = self.logging_cfg.histogram_every_n_steps
        if every and self.global_step % every == 0:
            self._histograms("train", rewards[best], rewards[~best])
        return loss

    def on_train_epoch_end(self) -> None:
        if self.train_acc.total > 0:
            self.log("reward/train/epoch_accuracy", self.train_acc.compute())
        self.train_acc.reset()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._step_start
        pairs = _num_pairs(batch)
        if elapsed > 0:
            self.log(
                "reward/perf/pairs_per_s",
                pairs / elapsed,
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )
            self.log(
                "reward/perf/rows_per_s", len(batch["rank"]) / elapsed, on_step=True, batch_size=1
            )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        rewards, loss, parts = self._shared_step(batch)
        best = batch["rank"] == 0  # [R]
        groups = int(batch["num_groups"])
        self.val_acc(parts["diff"])
        self.val_margin(parts["diff"])
        self.val_chosen(rewards[best])
        self.val_rejected(rewards[~best])
        self._val_rewards["chosen"].append(rewards[best].detach().cpu())
        self._val_rewards["rejected"].append(rewards[~best].detach().cpu())
        self.log("reward/val/loss", loss, on_epoch=True, batch_size=groups, sync_dist=True)
        self.log(
            "reward/val/accuracy", self.val_acc, on_epoch=True, prog_bar=True, batch_size=groups
        )
        self.log("reward/val/margin", self.val_margin, on_epoch=True, batch_size=groups)
        if self.logging_cfg.worst_pairs:
            self._collect_worst(batch, parts)

    def on_validation_epoch_end(self) -> None:
        for name, metric in (("chosen", self.val_chosen), ("rejected", self.val_rejected)):
            moments = metric.compute()
            if moments["count"] > 0:
                self.log(f"reward/val/{name}_mean", moments["mean"])
                self.log(f"reward/val/{name}_std", moments["std"])
            metric.reset()
        chosen = _cat(self._val_rewards["chosen"])
        rejected = _cat(self._val_rewards["rejected"])
        if chosen.numel() and not self.trainer.sanity_checking:
            self._histograms("val", chosen, rejected)
        self._val_rewards = {"chosen": [], "rejected": []}
        if self._worst and not self.trainer.sanity_checking and self.logger is not None:
            rows = sorted(self._worst, key=lambda r: r["margin"])[: self.logging_cfg.worst_pairs]
            for row in rows:
                row["margin"] = f"{row['margin']:.3f}"
            log_text_table(self.logger, "reward/val/worst_pairs", rows, self.global_step)
        self._worst = []

    # ------------------------------------------------------------------ logging helpers
    def _histograms(self, split: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_histogram"):
            return
        for name, values in (("chosen", chosen), ("rejected", rejected)):
            if values.numel():
                tag = f"reward/{split}/{name}_rewards"
                experiment.add_histogram(tag, values.detach().float().cpu(), self.global_step)

    def _collect_worst(self, batch: dict, parts: dict) -> None:
        """Keep the `worst_pairs` lowest-margin pairs seen so far, decoded as text."""
        diff = parts["diff"]  # [P]
        keep = self.logging_cfg.worst_pairs
        k = min(keep, diff.numel())
        order = torch.argsort(diff)[:k]  # [k]
        threshold = max((r["margin"] for r in self._worst), default=float("inf"))
        ids, mask = batch["input_ids"], batch["attention_mask"]  # [R, T]
        for p in order.tolist():
            margin = float(diff[p])
            if len(self._worst) >= keep and margin >= threshold:
                break
            better, worse = int(parts["better"][p]), int(parts["worse"][p])
            prompt, chosen, rejected = _split_pair(
                ids[better][mask[better].bool()], ids[worse][mask[worse].bool()]
            )
            decode = self.tokenizer.decode
            cut = self.logging_cfg.table_chars
            self._worst.append(
                {
                    "margin": margin,
                    "prompt": decode(prompt)[-cut:],
                    "chosen": decode(chosen)[:cut],
                    "rejected": decode(rejected)[:cut],
                }
            )
        self._worst = sorted(self._worst, key=lambda r: r["margin"])[:keep]

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def reward_stats(self) -> dict:
        """Mean / std of rewards over the training split (best responses, and all rows)."""
        dm = self.trainer.datamodule
        loader = dm.dataloader("preference", split="train", shuffle=False)
        best_m, all_m = RewardMoments(), RewardMoments()
        was_training = self.model.training
        self.model.eval()
        for i, batch in enumerate(loader):
            cap = self.export_cfg.stats_max_batches
            if cap is not None and i >= cap:
                break
            rewards = self(
                batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            )
            best_m.update(rewards[batch["rank"] == 0].cpu())
            all_m.update(rewards.cpu())
        self.model.train(was_training)
        best, every = best_m.compute(), all_m.compute()
        return {
            "mean": float(best["mean"]),
            "std": float(best["std"]),
            "count": int(best["count"]),
            "all_mean": float(every["mean"]),
            "all_std": float(every["std"]),
            "all_count": int(every["count"]),
            "source": "best (rank 0) responses of the training split",
        }

    def on_fit_end(self) -> None:
        if not self.export_cfg.enabled or self.model is None or not self.trainer.is_global_zero:
            return
        if self.trainer.interrupted:
            return
        stats = self.reward_stats()
        out = export_reward_model(self.model, self.tokenizer, self.resolved_export_dir(), stats)
        rank_zero_info(
            f"reward model exported to {out} (reward mean {stats['mean']:.4f}, std {stats['std']:.4f})"
        )


def _num_pairs(batch: dict) -> int:
    """Number of ranked pairs in a stacked batch (sum over prompts of ordered pairs)."""
    group, rank = batch["group"], batch["rank"]  # [R], [R]
    same = group[:, None] == group[None, :]  # [R, R]
    return int((same & (rank[:, None] < rank[None, :])).sum())


def _split_pair(
    a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Common token prefix (the prompt) and the two remainders of two id rows."""
    n = min(len(a), len(b))
    differs = torch.nonzero(a[:n] != b[:n])
    cut = int(differs[0]) if differs.numel() else n
    return a[:cut], a[cut:], b[cut:]


def _cat(chunks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(chunks) if chunks else torch.empty(0)
