"""Typed records for the three data kinds, and parsing/validation of raw rows into them.

A raw row is one JSON object (a JSONL line, a JSON-array element, a parquet/HF row or an
in-memory dict). `parse_record(raw, kind, where)` turns it into a frozen record or raises a
one-line `RecordError` naming the location (`train.jsonl:17`, `data.parquet:row 3`) and the
field (`field 'chosen' is missing`).

Accepted layouts (field names follow TRL's dataset conventions, plus our own):

* demonstration: `prompt`+`response`, `prompt`+`completion`, `messages` (split at the last
  assistant turn), Alpaca `instruction`(+`input`)+`output`, or any preference layout (its best
  response is used).
* preference: `prompt`+`chosen`+`rejected` (+`margin`), `prompt`+`responses` (a ranking,
  best→worst, K ≥ 2), implicit-prompt `chosen`/`rejected` message lists, and Anthropic HH
  transcripts (`chosen`/`rejected` strings, split at the last "\\n\\nAssistant:" of their
  shared prefix). The responses of one record must differ after `.strip()` (an identical pair
  carries no preference; a repeated ranking entry would rank a response above itself).
* prompt: `prompt`, or the prompt part of any layout above.

References: TRL dataset formats (https://huggingface.co/docs/trl/dataset_formats);
Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF" (HH transcripts);
Ouyang et al. 2022, "Training language models to follow instructions" (K-wise rankings).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

KINDS = ("demonstration", "preference", "prompt")
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


class RecordError(ValueError):
    """Bad input data: a one-line message `location: field 'x' problem`."""


Messages = list[dict]


@dataclass(frozen=True)
class Demonstration:
    """A prompt (chat messages ending with a user turn) and the demonstrated response."""

    prompt: Messages
    response: str


@dataclass(frozen=True)
class Comparison:
    """A prompt and K ≥ 2 responses ordered best→worst; `margin` is an optional BT margin."""

    prompt: Messages
    responses: tuple[str, ...]
    margin: float | None = None


@dataclass(frozen=True)
class PromptRecord:
    """A prompt alone (PPO rollouts, labeling, evaluation)."""

    prompt: Messages


Record = Demonstration | Comparison | PromptRecord


class _Row:
    """Field access on one raw row: renames from a field map, errors naming location+field."""

    def __init__(self, raw: dict, where: str, fields: dict[str, str] | None):
        self.raw, self.where, self.map = raw, where, fields or {}

    def name(self, key: str) -> str:
        return self.map.get(key, key)

    def has(self, key: str) -> bool:
        return self.raw.get(self.name(key)) is not None  # None (e.g. unified HF columns) = absent

    def get(self, key: str) -> Any:
        if not self.has(key):
            raise self.error(key, "is missing")
        return self.raw[self.name(key)]

    def error(self, key: str, problem: str) -> RecordError:
        return RecordError(f"{self.where}: field '{self.name(key)}' {problem}")

    def layout_error(self, kind: str, expected: str) -> RecordError:
        found = ", ".join(repr(k) for k in self.raw) or "none"
        return RecordError(f"{self.where}: no {kind} fields: expected {expected} (found: {found})")


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_messages(row: _Row, key: str, value: Any) -> Messages:
    """Validate a chat message list: non-empty, each {'role': str, 'content': str}."""
    if not value:
        raise row.error(key, "is an empty message list")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise row.error(f"{key}", f"item {i} must be a message dict (got {_type_name(msg)})")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise row.error(key, f"item {i} needs string 'role' and 'content'")
        out.append({"role": role, "content": content})
    return out


def _prompt(row: _Row, key: str = "prompt") -> Messages:
    """A `prompt` field (string or message list) as a message list ending with a non-assistant turn."""
    value = row.get(key)
    if isinstance(value, str):
        if not value.strip():
            raise row.error(key, "is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        messages = _check_messages(row, key, value)
        if messages[-1]["role"] == "assistant":
            raise row.error(key, "must not end with an assistant turn")
        return messages
    raise row.error(key, f"must be a string or a list of chat messages (got {_type_name(value)})")


def _response_text(row: _Row, key: str, value: Any) -> str:
    """A response: a non-empty string, or a one-message assistant list (TRL conversational)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = _check_messages(row, key, value)[0]["content"]
    elif isinstance(value, list):
        raise row.error(
            key, f"must be a string or a single assistant message (got a list of {len(value)})"
        )
    elif not isinstance(value, str):
        raise row.error(key, f"must be a string (got {_type_name(value)})")
    if not value.strip():
        raise row.error(key, "is an empty response")
    return value


def _split_messages(row: _Row, key: str, value: Any) -> tuple[Messages, str]:
    """Split a conversation at its last assistant turn → (prompt messages, response text)."""
    if not isinstance(value, list):
        raise row.error(key, f"must be a list of chat messages (got {_type_name(value)})")
    messages = _check_messages(row, key, value)
    if messages[-1]["role"] != "assistant":
        raise row.error(key, "must end with an assistant turn")
    if len(messages) < 2:
        raise row.error(key, "has no turn before the last assistant turn")
    return messages[:-1], _response_text(row, key, messages[-1]["content"])


def hh_messages(text: str) -> Messages:
    """An HH transcript ("\\n\\nHuman: …\\n\\nAssistant: …") as a chat message list."""
    parts = _HH_TURN.split(text)
    messages = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": _ROLES[role], "content": content.strip()})
    return messages


def _hh_cut(row: _Row, chosen: str, rejected: str) -> int:
    """Index of the last "\\n\\nAssistant:" inside the prefix shared by both transcripts."""
    cut = os.path.commonprefix([chosen, rejected]).rfind(HH_ASSISTANT)
    if cut < 0:
        raise row.error(
            "chosen", "has no '\\n\\nAssistant:' turn shared with 'rejected' (add a 'prompt' field)"
        )
    if not hh_messages(chosen[:cut]):
        raise row.error("chosen", "has an empty prompt before the last '\\n\\nAssistant:'")
    return cut


def _pair_values(row: _Row) -> tuple[Any, Any]:
    return row.get("chosen"), row.get("rejected")


def _comparison_prompt(row: _Row) -> Messages:
    """The prompt of any preference layout, without validating its responses."""
    if row.has("prompt"):
        return _prompt(row)
    chosen, rejected = _pair_values(row)
    if isinstance(chosen, str) and isinstance(rejected, str):
        return hh_messages(chosen[: _hh_cut(row, chosen, rejected)])
    prompt, _ = _split_messages(row, "chosen", chosen)
    return prompt


def _pair_responses(row: _Row) -> tuple[Messages, str, str]:
    """(prompt, chosen, rejected) for explicit, implicit-message and HH-transcript pairs."""
    chosen, rejected = _pair_values(row)
    if row.has("prompt"):
        prompt = _prompt(row)
        return (
            prompt,
            _response_text(row, "chosen", chosen),
            _response_text(row, "rejected", rejected),
        )
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = _hh_cut(row, chosen, rejected)
        prompt = hh_messages(chosen[:cut])
        start = cut + len(HH_ASSISTANT)
        return (
            prompt,
            _response_text(row, "chosen", chosen[start:].strip()),
            _response_text(row, "rejected", rejected[start:].strip()),
        )
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        bad = "chosen" if not isinstance(chosen, (list, str)) else "rejected"
        value = row.get(bad)
        raise row.error(
            bad, f"must be a string or a list of chat messages (got {_type_name(value)})"
        )
    prompt, best = _split_messages(row, "chosen", chosen)
    other_prompt, worst = _split_messages(row, "rejected", rejected)
    if other_prompt != prompt:
        raise row.error(
            "rejected", "has a different conversation before its last turn than 'chosen'"
        )
    return prompt, best, worst


def _margin(row: _Row) -> float | None:
    if not row.has("margin"):
        return None
    value = row.get("margin")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise row.error("margin", f"must be a finite number (got {value!r})")
    return float(value)


def _ranking(row: _Row) -> tuple[str, ...]:
    value = row.get("responses")
    if not isinstance(value, list):
        raise row.error("responses", f"must be a list of responses (got {_type_name(value)})")
    if len(value) < 2:
        raise row.error("responses", f"needs at least 2 responses (got {len(value)})")
    return tuple(_response_text(row, f"responses[{i}]", v) for i, v in enumerate(value))


def _check_distinct(row: _Row, responses: tuple[str, ...], ranking: bool) -> None:
    """Raise when two responses are equal after `.strip()`: such a pair carries no preference."""
    first_seen: dict[str, int] = {}
    for i, response in enumerate(responses):
        j = first_seen.setdefault(response.strip(), i)
        if j == i:
            continue
        if ranking:
            raise row.error(
                f"responses[{i}]",
                f"is identical to 'responses[{j}]' (a response cannot rank above itself)",
            )
        raise row.error("rejected", f"is identical to '{row.name('chosen')}' (no preference)")


PREFERENCE_LAYOUTS = "'prompt'+'chosen'+'rejected', 'prompt'+'responses', or HH 'chosen'+'rejected'"
DEMONSTRATION_LAYOUTS = (
    "'prompt'+'response', 'prompt'+'completion', 'messages', 'instruction'+'output' "
    "or a preference layout"
)


def _is_preference(row: _Row) -> bool:
    return row.has("responses") or row.has("chosen") or row.has("rejected")


def _comparison_fields(row: _Row) -> Comparison:
    """Any preference layout as a Comparison (responses not yet checked to differ)."""
    if row.has("responses"):
        return Comparison(_prompt(row), _ranking(row), _margin(row))
    if row.has("chosen") or row.has("rejected"):
        prompt, chosen, rejected = _pair_responses(row)
        return Comparison(prompt, (chosen, rejected), _margin(row))
    if row.has("prompt"):
        raise row.error("chosen", "is missing")
    raise row.layout_error("preference", PREFERENCE_LAYOUTS)


def _comparison(row: _Row) -> Comparison:
    comparison = _comparison_fields(row)
    _check_distinct(row, comparison.responses, ranking=row.has("responses"))
    return comparison


def _alpaca_prompt(row: _Row) -> Messages:
    """Alpaca: the instruction, then the optional input after a blank line, as one user turn."""
    instruction = row.get("instruction")
    extra = row.raw.get(row.name("input")) or ""
    if not isinstance(instruction, str) or not instruction.strip():
        raise row.error("instruction", "must be a non-empty string")
    if not isinstance(extra, str):
        raise row.error("input", f"must be a string (got {_type_name(extra)})")
    text = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": text}]


def _demonstration(row: _Row) -> Demonstration:
    if row.has("messages"):
        return Demonstration(*_split_messages(row, "messages", row.get("messages")))
    if _is_preference(row):  # the best response is a demonstration even if others repeat it
        best = _comparison_fields(row)
        return Demonstration(best.prompt, best.responses[0])
    if row.has("prompt"):
        key = "completion" if row.has("completion") else "response"
        return Demonstration(_prompt(row), _response_text(row, key, row.get(key)))
    if row.has("instruction"):
        return Demonstration(_alpaca_prompt(row), _response_text(row, "output", row.get("output")))
    raise row.layout_error("demonstration", DEMONSTRATION_LAYOUTS)


def _prompt_record(row: _Row) -> PromptRecord:
    if row.has("prompt"):
        return PromptRecord(_prompt(row))
    if row.has("messages"):
        value = row.get("messages")
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            if value[-1].get("role") != "assistant":
                return PromptRecord(_check_messages(row, "messages", value))
        return PromptRecord(_split_messages(row, "messages", value)[0])
    if row.has("instruction"):
        return PromptRecord(_alpaca_prompt(row))
    if row.has("chosen") or row.has("rejected"):
        return PromptRecord(_comparison_prompt(row))
    raise row.layout_error("prompt", "'prompt', 'messages', 'instruction' or a preference layout")


_PARSERS = {"demonstration": _demonstration, "preference": _comparison, "prompt": _prompt_record}


def check_kind(kind: str) -> str:
    """Return `kind` if it is one of `KINDS`, else raise a one-line ValueError."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r} (expected one of {', '.join(KINDS)})")
    return kind


def parse_record(
    raw: Any, kind: str, where: str, fields: dict[str, str] | None = None
) -> Demonstration | Comparison | PromptRecord:
    """Parse one raw row into a record of `kind`.

    Args:
        raw: the row (must be a dict / JSON object).
        kind: "demonstration", "preference" or "prompt".
        where: location for error messages, e.g. "train.jsonl:17" or "data.parquet:row 3".
        fields: optional rename map {our field name: the row's column name}, e.g.
            {"prompt": "question", "response": "answer"}.

    Raises:
        RecordError: one line, `"{where}: field '{name}' {problem}"`.
    """
    check_kind(kind)
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: expected a JSON object (got {_type_name(raw)})")
    return _PARSERS[kind](_Row(raw, where, fields))
