"""Toy reward functions for smoke tests and debugging PPO set-ups without a reward model.

Use them through `model.reward.function` (import path) and `model.reward.function_kwargs`, e.g.
`function: rlhf_lightning.ppo.toy:word_frequency` with `function_kwargs: {word: good}`. A PPO run
on a tiny random model should drive these up within a few dozen iterations; if it does not, the
training loop (not the reward model) is broken.
"""

from __future__ import annotations

__all__ = ["word_frequency", "response_length"]


def word_frequency(prompts: list[str], responses: list[str], word: str = "good") -> list[float]:
    """Fraction of the whitespace-separated words of each response equal to `word` (0 if empty)."""
    scores = []
    for response in responses:
        words = response.split()
        scores.append(sum(w == word for w in words) / len(words) if words else 0.0)
    return scores


def response_length(prompts: list[str], responses: list[str], scale: float = 0.1) -> list[float]:
    """`scale` × number of words of each response."""
    return [scale * len(r.split()) for r in responses]
