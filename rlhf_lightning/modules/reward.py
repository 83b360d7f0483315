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
mean and std, histograms), `reward/val/worst_pairs` (text table), `perf/*`.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from rlhf_lightning.models.loading import ModelSpec, load_sequence_classifier
from rlhf_lightning.models.reward_export import export_reward_model, score_rows
from rlhf_lightning.modules.base import StageModule
from rlhf_lightning.modules.common import OptimConfig, lightning_optimizers, log_text_table
from rlhf_lightning.modules.reward_losses import reward_model_loss
from rlhf_lightning.modules.reward_metrics import PairwiseAccuracy, RewardMoments
from rlhf_lightning.modules.reward_packing import packing_is_exact, score_rows_packed


class RewardModule(StageModule):
    """Trains a scalar reward model on ranked responses and exports it at the end of fit."""

    data_kind = "preference"

    def __init__(
        self,
        model_spec: ModelSpec,
        optim: OptimConfig | None = None,
        use_margin: bool = True,
        center_coef: float = 0.0,
        pack: bool = True,
        pack_max_tokens: int = 8192,
        export: bool = True,
        export_dir: str | None = None,
        stats_max_batches: int | None = None,
        histogram_every_n_steps: int = 50,
        worst_pairs: int = 8,
        table_chars: int = 300,
    ) -> None:
        """Build the module; the network itself is created in `configure_model`.

        Args:
            model_spec: Backbone to load: hub id / local dir (e.g. the SFT export), GGUF file or a
                config dict. A causal-LM checkpoint gets a fresh scalar head (`num_labels=1`).
            optim: Optimiser and warmup+cosine schedule (`OptimConfig`); defaults when None.
            use_margin: Subtract each record's `margin` inside the sigmoid
                (`-log σ(r_c - r_r - margin)`); records without one use 0.
            center_coef: Weight of the reward-centering term `mean_prompt(mean reward)²`
                that keeps rewards near 0; 0 disables it (Eisenstein et al. use 0.01).
            pack: Score each batch as one packed sequence in which every prompt is computed
                once for all its responses and no padding is computed (exact; several times
                fewer token-FLOPs on chat data). Checked on the model at start; falls back
                to padded rows (with a warning) when the backbone does not support it.
            pack_max_tokens: Batches whose packed length exceeds this use padded rows
                (the packed attention mask is N x N).
            export: Export the model, tokenizer and `reward_stats.json` when fit ends.
            export_dir: Where to export; null = `<log_dir>/export`.
            stats_max_batches: Cap on training batches scored for `reward_stats.json`
                (None = the whole training split).
            histogram_every_n_steps: Log reward histograms of training batches this often
                (0 disables; validation histograms are logged every validation epoch).
            worst_pairs: Rows in the validation table of the pairs ranked most wrongly.
            table_chars: Characters of each text kept in that table.
        """
        super().__init__()
        if center_coef < 0:
            raise ValueError(f"center_coef: must be >= 0, got {center_coef}")
        if isinstance(model_spec, dict):
            model_spec = ModelSpec(**model_spec)
        self.spec = model_spec
        self.optim = optim if optim is not None else OptimConfig()
        self.use_margin = use_margin
        self.center_coef = center_coef
        self.pack = pack
        self.pack_max_tokens = pack_max_tokens
        self._packed_ok = False
        self.export = export
        self.export_dir = export_dir
        self.stats_max_batches = stats_max_batches
        self.histogram_every_n_steps = histogram_every_n_steps
        self.worst_pairs = worst_pairs
        self.table_chars = table_chars
        self.save_hyperparameters()
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
            self.spec, vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id
        )
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes
        if self.pack:
            self._packed_ok = packing_is_exact(self.model, len(tokenizer))
            if not self._packed_ok:
                rank_zero_warn(
                    f"pack: {type(self.model).__name__} does not support packed scoring; "
                    "using padded rows"
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
        if self._packed_ok and int(mask.sum()) <= self.pack_max_tokens:
            return score_rows_packed(
                self.model, ids, mask, batch["group"], int(batch["num_groups"])
            )
        return self(ids, mask)

    def _shared_step(self, batch: dict):
        rewards = self.score_batch(batch)  # [R]
        margin = batch.get("margin") if self.use_margin else None  # [G]
        loss, parts = reward_model_loss(
            rewards,
            batch["group"],
            batch["rank"],
            int(batch["num_groups"]),
            margin=margin,
            center_coef=self.center_coef,
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
        every = self.histogram_every_n_steps
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
                "perf/pairs_per_s", pairs / elapsed, on_step=True, on_epoch=False, batch_size=1
            )
            self.log("perf/rows_per_s", len(batch["rank"]) / elapsed, on_step=True, batch_size=1)

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
        if self.worst_pairs:
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
            rows = sorted(self._worst, key=lambda r: r["margin"])[: self.worst_pairs]
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
        k = min(self.worst_pairs, diff.numel())
        order = torch.argsort(diff)[:k]  # [k]
        threshold = max((r["margin"] for r in self._worst), default=float("inf"))
        ids, mask = batch["input_ids"], batch["attention_mask"]  # [R, T]
        for p in order.tolist():
            margin = float(diff[p])
            if len(self._worst) >= self.worst_pairs and margin >= threshold:
                break
            better, worse = int(parts["better"][p]), int(parts["worse"][p])
            prompt, chosen, rejected = _split_pair(
                ids[better][mask[better].bool()], ids[worse][mask[worse].bool()]
            )
            decode = self.tokenizer.decode
            cut = self.table_chars
            self._worst.append(
                {
                    "margin": margin,
                    "prompt": decode(prompt)[-cut:],
                    "chosen": decode(chosen)[:cut],
                    "rejected": decode(rejected)[:cut],
                }
            )
        self._worst = sorted(self._worst, key=lambda r: r["margin"])[: self.worst_pairs]

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
            if self.stats_max_batches is not None and i >= self.stats_max_batches:
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
        if not self.export or self.model is None or not self.trainer.is_global_zero:
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
