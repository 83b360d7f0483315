"""`module:function` scorers: one convention for reward functions, gold functions and labelers.

A scorer is named by an import path `"package.module:attr"` (`attr` may be dotted) plus optional
keyword arguments, and `load_scorer` turns it into a `BatchScorer`, called as
`scorer(prompts, responses) -> list[float]`:

- a class is instantiated with the keyword arguments (a factory such as
  `rlhf_lightning.labeling:RewardModelLabeler` or `LookupLabeler`); a function gets them bound
  (`functools.partial`);
- an object with a `score_batch(prompts, responses)` method is called once per batch with lists;
- anything else is called with lists first — `(prompts, responses) -> list[float]` — and, when
  that fails or does not return one number per pair, once per pair — `(prompt, response) ->
  float` (`batched` true/false fixes the form). A per-sample function therefore also gets one
  call with lists first; it must not have side effects on that call;
- every score must be a finite number (one-line error naming the config key and the sample).

Used by `model.reward.function` / `model.reward.gold` (PPO), `labeler` (`rlhf label`) and the
gold judge of `rlhf evaluate` (`rlhf_lightning.evaluation`).
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["BatchScorer", "split_import_path", "load_object", "load_scorer", "call_scorer"]


def split_import_path(path: str, field: str) -> tuple[str, str]:
    """`"module:attr"` → `(module, attr)`; a one-line error naming `field` for any other form."""
    module_name, sep, attr = str(path).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{field}: {path!r} is not an import path of the form 'module:function'")
    return module_name, attr


def load_object(path: str, field: str) -> object:
    """Import the object named by `"module:attr"` (one-line errors naming `field`)."""
    module_name, attr = split_import_path(path, field)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{field}: cannot import {path!r} ({err})") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{field}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class BatchScorer:
    """A loaded scorer: `scorer(prompts, responses) -> list[float]` (see the module docstring)."""

    fn: Callable
    """The callable: a `score_batch` method, a function (kwargs bound) or a callable object."""
    batched: bool | None
    """Whether `fn` takes lists; None = lists first, then one call per pair."""
    field: str
    """Config key named in error messages (e.g. `model.reward.function`, `labeler`)."""

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return call_scorer(self.fn, prompts, responses, self.batched, self.field)


def load_scorer(
    path: str, field: str, kwargs: dict | None = None, batched: bool | None = None
) -> BatchScorer:
    """Import `"module:attr"` and make it a `BatchScorer` (classes are instantiated with
    `kwargs`, functions get them bound; `score_batch` objects are always called with lists)."""
    obj = load_object(path, field)
    if isinstance(obj, type):
        obj = obj(**(kwargs or {}))
    elif kwargs:
        if not callable(obj):
            raise ValueError(f"{field}: {path!r} is not callable")
        obj = functools.partial(obj, **kwargs)
    score_batch = getattr(obj, "score_batch", None)
    if callable(score_batch):
        return BatchScorer(score_batch, True, field)
    if not callable(obj):
        raise ValueError(f"{field}: {path!r} is not callable")
    return BatchScorer(obj, batched, field)


def _scores_from_lists(
    fn: Callable, prompts: list[str], responses: list[str], batched: bool | None, field: str
) -> tuple[list[float] | None, Exception | None]:
    """One call with lists: (scores, None), or (None, the error) when a fallback may follow."""
    try:
        out = fn(prompts, responses)
    except Exception as err:  # a per-sample function given lists fails in arbitrary ways
        if batched:
            raise
        return None, err
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if isinstance(out, Sequence) and len(out) == len(prompts):
        return [float(x) for x in out], None
    if batched:
        raise ValueError(f"{field}: expected a list of {len(prompts)} floats, got {type(out)}")
    return None, None


def call_scorer(
    fn: Callable, prompts: list[str], responses: list[str], batched: bool | None, field: str
) -> list[float]:
    """Scores from a (prompts, responses) → list or (prompt, response) → float callable.

    With `batched=None`, lists are tried first; a result that is not a sequence of len(prompts)
    numbers (or an exception) falls back to one call per pair. Non-finite scores are an error.
    """
    scores, batch_error = None, None
    if batched is not False:
        scores, batch_error = _scores_from_lists(fn, prompts, responses, batched, field)
    if scores is None:
        try:
            scores = [float(fn(p, r)) for p, r in zip(prompts, responses)]
        except Exception as err:
            if batch_error is not None:
                raise ValueError(
                    f"{field}: fails with lists ({batch_error!r}) and per sample ({err!r})"
                ) from err
            raise
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"{field}: non-finite score for sample {bad[0]}: {responses[bad[0]]!r}")
    return scores
