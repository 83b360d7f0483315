"""Scoring with, exporting and re-loading reward models.

Scores are read at the last non-padding token found from the attention mask
(`heads.last_token_scores`, which PPO scores with too), never from the pad id: with pad ==
eos tokenizers the pad-id rule of `*ForSequenceClassification` would skip the EOS that ends
every response and read the token before it (a silent reward-model bug). The export makes plain transformers agree
with training: when the tokenizer's pad token is missing or equals EOS, a dedicated pad
token is added (embedding rows grown only if the vocabulary is full) and written as
`config.pad_token_id`, so `AutoModelForSequenceClassification` pools the same position.
Beside the weights, `reward_stats.json` holds the mean / std of rewards over the
training data's best responses, for reward normalisation in PPO (Ziegler et al. 2019,
§2: the reward model is normalised to mean 0 / std 1 before RL); `reward_scale` is the one rule
that turns them into (mean, std), for `normalise` and for the critic initialised from the RM.

This module imports only torch, transformers and `rlhf_lightning.models`, so the stage modules,
PPO and the labeler all import it at module level.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

from rlhf_lightning.models.heads import last_token_scores
from rlhf_lightning.models.loading import is_peft, unwrap_peft

STATS_FILE = "reward_stats.json"
RM_PAD_TOKEN = "<|reward_pad|>"
_HEAD_NAMES = ("score", "classifier")
# What `export_reward_model` writes (any one name of each group): config, weights, tokenizer.
EXPORT_FILES = (
    ("config.json",),
    ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
    ("tokenizer.json", "tokenizer_config.json"),
)


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a `*ForSequenceClassification` model into (backbone, scalar head)."""
    inner = unwrap_peft(model, merge=False)
    head = next((getattr(inner, n) for n in _HEAD_NAMES if hasattr(inner, n)), None)
    backbone = getattr(inner, "base_model", None)
    if head is None or backbone is None or backbone is inner:
        raise TypeError(
            f"{type(inner).__name__} is not a sequence classifier with a `score`/`classifier` head"
        )
    return backbone, head


def score_rows(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, forward=None
) -> torch.Tensor:
    """Scalar reward per row of a sequence classifier, read at the last attended token.

    ids/mask Long[R, T] → Float[R]; any padding side (see `heads.last_token_scores`). `forward`:
    what to call instead of the backbone (e.g. its `torch.compile` wrapper).
    """
    backbone, head = backbone_and_head(model)
    return last_token_scores(backbone, head, input_ids, attention_mask, forward)  # [R]


@torch.no_grad()
def score_texts(
    model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 16, max_length: int = 1024
) -> list[float]:
    """Rewards of full texts (rendered prompt + response + EOS), right-padded batches."""
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    scores: list[float] = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
                add_special_tokens=False,
            )
            out = score_rows(model, enc["input_ids"].to(device), enc["attention_mask"].to(device))
            scores.extend(out.tolist())
    finally:
        tokenizer.padding_side = side
    return scores


def _needs_own_pad(tokenizer) -> bool:
    pad = tokenizer.pad_token_id
    return pad is None or pad == tokenizer.eos_token_id


def export_reward_model(
    model: nn.Module, tokenizer, out_dir: str | Path, stats: dict | None = None
) -> Path:
    """Write an `AutoModelForSequenceClassification`-loadable RM (+ tokenizer, stats).

    LoRA adapters are merged into a copy; the trained `model` is left unchanged.
    """
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    export_tok = AutoTokenizer.from_pretrained(out_dir)
    export_model = unwrap_peft(model, merge=True) if is_peft(model) else copy.deepcopy(model)
    if _needs_own_pad(export_tok):
        export_tok.add_special_tokens({"pad_token": RM_PAD_TOKEN})
        rows = export_model.get_input_embeddings().weight.shape[0]
        if len(export_tok) > rows:
            export_model.resize_token_embeddings(len(export_tok), mean_resizing=False)
        export_tok.save_pretrained(out_dir)
    export_model.config.pad_token_id = export_tok.pad_token_id
    export_model.config.num_labels = 1
    export_model.save_pretrained(out_dir)
    if stats is not None:
        (out_dir / STATS_FILE).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_reward_model(
    export_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
):
    """Load an export: `(model, tokenizer, stats)`; model in eval mode, frozen.

    `stats` is the dict from `reward_stats.json` (`mean`, `std`, `count`, ...) or `None`
    when the export has none. Score with `score_rows` / `score_texts`, or with plain
    `model(input_ids, attention_mask).logits[:, 0]` on batches padded with the export's
    tokenizer.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    export_dir = Path(export_dir)
    missing = [
        " or ".join(names)
        for names in EXPORT_FILES
        if not any((export_dir / name).is_file() for name in names)
    ]
    if missing:
        raise FileNotFoundError(
            f"{export_dir}: not a reward-model export (missing {'; '.join(missing)})"
        )
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForSequenceClassification.from_pretrained(export_dir, num_labels=1, **kwargs)
    model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    stats_path = export_dir / STATS_FILE
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    return model, tokenizer, stats


def reward_scale(stats: dict | None, eps: float = 1e-6) -> tuple[float, float]:
    """(mean, std) to normalise rewards with, from an export's `reward_stats.json` dict.

    No stats: (0, 1). A missing mean is 0; a missing, non-finite or ≤ `eps` std is 1.
    """
    if not stats:
        return 0.0, 1.0
    std = float(stats.get("std", 1.0))
    return float(stats.get("mean", 0.0)), (std if math.isfinite(std) and std > eps else 1.0)


def normalise(rewards: torch.Tensor, stats: dict | None) -> torch.Tensor:
    """`(r - mean) / std` with the export's stats (`reward_scale`; identity when `stats` is None)."""
    if not stats:
        return rewards
    mean, std = reward_scale(stats)
    return (rewards - mean) / std
