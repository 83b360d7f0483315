"""SFTModule: supervised fine-tuning of a causal LM on demonstrations (stage 1 of RLHF).

The loss is the negative log-likelihood of the response tokens only (prompt and
padding carry label -100), averaged over every response token of an optimizer
step — not per micro-batch and not per sequence — so that splitting a batch into
micro-batches or accumulating gradients leaves the gradient unchanged.

How the per-token normalisation survives Lightning's accumulation: with
`accumulate_grad_batches=k` Lightning divides each returned loss by k. A
micro-batch cannot be divided by the step's total token count (later micro-batches
are not seen yet), so each returns `nll_sum / c`, where `c` is the token count of
the window's first micro-batch (a scale that keeps loss magnitudes usual for AMP).
The gradients then hold `Σ nll_sum / (c·k)`; in `on_before_optimizer_step` (after
AMP unscaling, before clipping) they are multiplied by `c·k·W / N`, where N is the
token count of the whole window summed over all W data-parallel ranks (DDP averages
gradients over ranks). The result is exactly `∇ Σ nll / N`.

TensorBoard tags: `sft/train/{loss,lr,tokens}`, `sft/val/{loss,ppl}`, `sft/perf/tokens_per_s`,
and the text table `sft/samples` (`SFTSampleConfig`).

References: Ouyang et al. 2022 ("Training language models to follow instructions
with human feedback", the SFT stage); Lightning automatic optimisation and
gradient accumulation (https://lightning.ai/docs/pytorch/stable/common/optimization.html).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import SumMetric

from rlhf_lightning.models.loading import ModelSpec, export_pretrained, load_causal_lm
from rlhf_lightning.modules.base import StageModule, coerce_config
from rlhf_lightning.modules.common import OptimConfig, lightning_optimizers, log_text_table

IGNORE_INDEX = -100


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over labelled positions and their count.

    `logits` [B, T, V] predict token t+1 at position t; `labels` [B, T] hold token ids
    on response positions and -100 elsewhere. Returns (nll_sum: float32 scalar, n_tokens: long scalar).
    """
    shifted_logits = logits[:, :-1].float()  # [B, T-1, V]
    shifted_labels = labels[:, 1:]  # [B, T-1]
    nll_sum = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),  # [B*(T-1), V]
        shifted_labels.reshape(-1),  # [B*(T-1)]
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    n_tokens = (shifted_labels != IGNORE_INDEX).sum()  # []
    return nll_sum, n_tokens


@dataclass
class SFTSampleConfig:
    """The sample table `sft/samples`: generations for a few validation prompts.

    Columns prompt | generated | reference; logged at step 0, every `every_n_steps` optimizer
    steps and at the end of fit.
    """

    every_n_steps: int = 50
    """Log the table every this many optimizer steps; 0 disables the table."""
    num: int = 4
    """Validation prompts shown in the table; 0 disables the table."""
    max_new_tokens: int = 32
    """Generation length limit of the table's responses."""
    temperature: float = 0.0
    """Sampling temperature of the table's responses; 0 = greedy decoding."""


class SFTModule(StageModule):
    """Supervised fine-tuning on demonstration records (prompt → response)."""

    data_kind = "demonstration"

    def __init__(
        self,
        model_spec: ModelSpec,
        optim: OptimConfig | None = None,
        samples: SFTSampleConfig | None = None,
        export_dir: str | None = None,
    ):
        """Build the module; the model itself is created in `configure_model()`.

        Args:
            model_spec: the policy to fine-tune: hub id / local dir / GGUF file / config dict,
                dtype, gradient checkpointing, LoRA (see `ModelSpec`).
            optim: AdamW + warmup/cosine settings (see `OptimConfig`); null = defaults.
            samples: the text table of generations for validation prompts (`sft/samples`, see
                `SFTSampleConfig`); null = defaults.
            export_dir: directory for the final `save_pretrained` export (model + tokenizer),
                written at the end of `fit`; null = `<log_dir>/export`.
        """
        super().__init__()
        self.model_spec = coerce_config(ModelSpec, model_spec)
        self.optim = coerce_config(OptimConfig, optim)
        self.samples_cfg = coerce_config(SFTSampleConfig, samples)
        self.export_dir = export_dir
        self.save_plain_hparams()
        self.model = None
        self.val_nll = SumMetric()
        self.val_tokens = SumMetric()
        self._reset_window()
        self._t_last = None
        self._stepped = False
        self._last_sample_step = -1

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Load or build the causal LM (vocab size and special ids from the tokenizer)."""
        if self.model is not None:
            return
        tok = self.tokenizer
        self.model = load_causal_lm(
            self.model_spec, vocab_size=len(tok), pad_token_id=tok.pad_token_id
        )
        if self.model_spec.config is not None:  # fresh model: take every special id from tok
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                setattr(self.model.config, name, getattr(tok, name))
                setattr(self.model.generation_config, name, getattr(tok, name))
        elif self.model.generation_config.pad_token_id is None:
            self.model.generation_config.pad_token_id = tok.pad_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for input_ids/attention_mask [B, T]."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def configure_optimizers(self):
        return lightning_optimizers(self.model.named_parameters(), self.optim, self.trainer)

    # --------------------------------------------------------------- training
    def _reset_window(self) -> None:
        self._win_tokens = None  # response tokens in this accumulation window (this rank)
        self._win_nll = None  # summed NLL in this window (this rank, detached)
        self._win_seen = 0  # all attended tokens (throughput)
        self._win_norm = None  # c: the scale every micro-batch of the window divides by

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])  # [B, T, V]
        nll_sum, n_tokens = sft_loss_sum(logits, batch["labels"])
        if self._win_norm is None:  # first micro-batch of the window; same c on every rank
            c = self.trainer.strategy.reduce(n_tokens.float(), reduce_op="mean")
            self._win_norm = c.clamp_min(1.0)
            self._win_tokens = torch.zeros((), device=self.device)
            self._win_nll = torch.zeros((), device=self.device)
        self._win_tokens += n_tokens
        self._win_nll += nll_sum.detach()
        self._win_seen += int(batch["attention_mask"].sum())
        return nll_sum / self._win_norm

    def on_before_optimizer_step(self, optimizer) -> None:
        """Turn the accumulated gradients into the per-token mean over the whole step."""
        if self._win_norm is None:
            return
        strategy = self.trainer.strategy
        total = strategy.reduce(self._win_tokens.float(), reduce_op="sum").clamp_min(1.0)
        nll = strategy.reduce(self._win_nll, reduce_op="sum")
        scale = self._win_norm * self.trainer.accumulate_grad_batches * self.trainer.world_size
        factor = (scale / total).item()
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(factor)
        now = time.perf_counter()
        elapsed = now - self._t_last if self._t_last is not None else float("nan")
        seen = self._win_seen * self.trainer.world_size
        self.log("sft/train/loss", nll / total, prog_bar=True)
        self.log("sft/train/lr", optimizer.param_groups[0]["lr"])
        self.log("sft/train/tokens", total)
        if math.isfinite(elapsed) and elapsed > 0:
            self.log("sft/perf/tokens_per_s", seen / elapsed)
        self._t_last = now
        self._stepped = True
        self._reset_window()

    def on_train_start(self) -> None:
        self._log_samples()  # the untrained model's generations, for comparison
        self._t_last = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if not self._stepped:
            return
        self._stepped = False
        n = self.samples_cfg.every_n_steps
        if n > 0 and self.global_step % n == 0:
            self._log_samples()
            self._t_last = time.perf_counter()  # sampling time is not training throughput

    def on_train_end(self) -> None:
        self._log_samples()

    # ------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])  # [B, T, V]
        nll_sum, n_tokens = sft_loss_sum(logits, batch["labels"])
        self.val_nll.update(nll_sum)
        self.val_tokens.update(n_tokens.float())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_nll.compute() / self.val_tokens.compute().clamp_min(1.0)
        self.val_nll.reset()
        self.val_tokens.reset()
        self.log("sft/val/loss", loss, prog_bar=True)
        self.log("sft/val/ppl", torch.exp(loss))

    def on_validation_end(self) -> None:
        self._t_last = time.perf_counter()

    # ---------------------------------------------------------------- samples
    def _sample_records(self) -> list:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "records"):
            return []
        records = datamodule.records(self.data_kind, "val") or datamodule.records(self.data_kind)
        return list(records[: self.samples_cfg.num])

    @torch.no_grad()
    def generate_samples(self, records: list) -> list[dict]:
        """Generate a response for each demonstration's prompt: rows for the sample table."""
        from rlhf_lightning.data.collate import collate_prompts
        from rlhf_lightning.data.templates import Tokenizing, TokenStats

        tok = self.tokenizer
        datamodule = getattr(self.trainer, "datamodule", None)
        max_prompt = getattr(datamodule, "max_prompt_length", 256)
        tokenizing = Tokenizing(tok, max_prompt + 1, max_prompt)
        examples = tokenizing.prompts(records, TokenStats())
        batch = collate_prompts(examples, pad_id=tok.pad_token_id)
        input_ids = batch["input_ids"].to(self.device)  # [N, P]
        attention_mask = batch["attention_mask"].to(self.device)  # [N, P]
        cfg = self.samples_cfg
        sampling = cfg.temperature > 0
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=sampling,
                temperature=cfg.temperature if sampling else None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )  # [N, P + new]
        finally:
            self.model.train(was_training)
        texts = tok.batch_decode(out[:, input_ids.size(1) :], skip_special_tokens=True)
        return [
            {"prompt": r.prompt[-1]["content"], "generated": text.strip(), "reference": r.response}
            for r, text in zip(records, texts)
        ]

    def _log_samples(self) -> None:
        step = self.global_step
        if (
            self.samples_cfg.num <= 0
            or self.samples_cfg.every_n_steps <= 0
            or step == self._last_sample_step
        ):
            return
        if not self.trainer.is_global_zero or not self.trainer.loggers:
            return
        records = self._sample_records()
        if not records:
            return
        self._last_sample_step = step
        log_text_table(self.trainer.loggers, "sft/samples", self.generate_samples(records), step)

    # ----------------------------------------------------------------- export
    def on_fit_end(self) -> None:
        """`save_pretrained` model (LoRA merged) + tokenizer, loadable by plain transformers."""
        if not self.trainer.is_global_zero or self.model is None:
            return
        out = export_pretrained(self.model, self.tokenizer, self.resolved_export_dir())
        rank_zero_info(f"SFT export written to {out}")
