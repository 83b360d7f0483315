"""The proxy scorer and the gold judge: a reward-model export or a `module:function`, one call.

Both are called as `judge(messages, responses, ends) -> list[float]` (one prompt's chat messages,
response text and EOS flag per sample). A reward-model export scores the text the way PPO's
re-tokenising scorer does (`rlhf_lightning.ppo.scoring.RewardModelScorer`): the prompt rendered
with the RM tokenizer's template, the separator, the response and EOS when the response ended with
one; the raw score is reported (no normalisation). A `module:function` scorer
(`rlhf_lightning.scorers.load_scorer`) gets the prompt as `rlhf label` gives it (the user's text
for single-turn prompts, else the plain transcript).
"""

from __future__ import annotations

from collections.abc import Callable

from rlhf_lightning.data.templates import render_prompt, response_separator
from rlhf_lightning.evaluation.config import ScorerConfig
from rlhf_lightning.labeling import prompt_for_labeler
from rlhf_lightning.models.reward_export import load_reward_model, score_texts
from rlhf_lightning.scorers import load_scorer

Judge = Callable[[list, list[str], list[bool]], list[float]]

__all__ = ["Judge", "RewardModelJudge", "FunctionJudge", "load_judge"]


class RewardModelJudge:
    """Raw scores of a reward-model export on (rendered prompt, response[, EOS]) texts."""

    def __init__(self, export_dir: str, *, batch_size: int, max_length: int, device: str):
        self.model, self.tokenizer, _ = load_reward_model(export_dir, device=device)
        self.batch_size, self.max_length = batch_size, max_length

    def __call__(self, messages: list, responses: list[str], ends: list[bool]) -> list[float]:
        tok = self.tokenizer
        sep, eos = response_separator(tok), tok.eos_token or ""
        texts = [
            render_prompt(tok, m) + sep + r + (eos if e else "")
            for m, r, e in zip(messages, responses, ends)
        ]
        return score_texts(
            self.model, tok, texts, batch_size=self.batch_size, max_length=self.max_length
        )


class FunctionJudge:
    """A `module:function` scorer given (prompt text, response) pairs."""

    def __init__(self, path: str, args: dict | None, key: str):
        self.scorer = load_scorer(path, key, args)

    def __call__(self, messages: list, responses: list[str], ends: list[bool]) -> list[float]:
        return self.scorer([prompt_for_labeler(m) for m in messages], list(responses))


def load_judge(cfg: ScorerConfig, key: str, device: str) -> Judge:
    """The judge of one scorer config (`key` = its config key, named in errors)."""
    if cfg.reward_model is not None:
        return RewardModelJudge(
            cfg.reward_model, batch_size=cfg.batch_size, max_length=cfg.max_length, device=device
        )
    return FunctionJudge(cfg.function, cfg.args, f"{key}.function")
