"""Prompt rendering and tokenisation of records, with the truncation policy.

Rendering: when the tokenizer has a chat template, the prompt messages go through
`tokenizer.apply_chat_template(..., add_generation_prompt=True)` and the response is appended
directly after it. Otherwise the documented PLAIN template is used::

    System: <content>\\n\\n        (one block per message; the role name capitalised)
    User: <content>\\n\\n
    Assistant: <content>\\n\\n
    Assistant:                    (generation prompt; the response follows after one space)

The prompt text is tokenised on its own (chat templates carry their special tokens in the text,
so `add_special_tokens` is only used for the plain template), the response text on its own
without special tokens, and the EOS id is appended after the response. Keeping the pieces
separate gives an exact prompt/response boundary, the same one PPO uses when it generates
response tokens after prompt tokens.

Truncation: responses are never cut. Prompts are left-truncated (their oldest tokens go) to at
most `max_prompt_length`, and further so that prompt + longest response + EOS fits `max_length`.
A record whose response(s) + EOS leave no room for at least one prompt token is skipped. Both
events are counted by the caller (`RLHFDataModule.stats`).

References: Hugging Face chat templates (https://huggingface.co/docs/transformers/chat_templating).
"""

from __future__ import annotations

from dataclasses import dataclass

from .records import Comparison, Demonstration, Messages, PromptRecord, Record, RecordError

PLAIN_GENERATION_PROMPT = "Assistant:"
PLAIN_RESPONSE_SEPARATOR = " "


def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_plain(messages: Messages) -> str:
    """The plain template (see module docstring), ending with the generation prompt."""
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
    return turns + PLAIN_GENERATION_PROMPT


def render_prompt(tokenizer, messages: Messages) -> str:
    """Prompt text: the tokenizer's chat template (with generation prompt), else the plain one."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return render_plain(messages)


def response_separator(tokenizer) -> str:
    """Text placed between the rendered prompt and the response ("" for chat templates)."""
    return "" if has_chat_template(tokenizer) else PLAIN_RESPONSE_SEPARATOR


@dataclass
class TokenStats:
    """Counts for one (kind, split): records in, prompts left-truncated, records skipped."""

    records: int = 0
    truncated: int = 0
    skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "records": self.records,
            "truncated": self.truncated,
            "skipped": self.skipped,
            "used": self.records - self.skipped,
        }

    def nothing_left(self, name: str, max_length: int) -> RecordError | None:
        """The error when records came in but every one was skipped as too long, else None."""
        if not self.records or self.skipped < self.records:
            return None
        return RecordError(
            f"{name}: no usable records ({self.records} record{'s' if self.records != 1 else ''}, "
            "all skipped: their responses "
            f"alone + EOS leave no room for a prompt token within max_length={max_length})"
        )


class Tokenizing:
    """Turns records into token-id examples under the truncation policy."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int):
        if max_length < 2 or max_prompt_length < 1:
            raise ValueError(
                f"need max_length >= 2 and max_prompt_length >= 1 "
                f"(got {max_length}, {max_prompt_length})"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set `eos_token` on it")
        self.tok, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length
        self.chat = has_chat_template(tokenizer)
        self.sep = response_separator(tokenizer)

    def _ids(self, texts: list[str], special: bool) -> list[list[int]]:
        if not texts:
            return []
        return self.tok(texts, add_special_tokens=special)["input_ids"]

    def _prompts(self, records: list[Record]) -> tuple[list[str], list[list[int]]]:
        texts = []
        for i, record in enumerate(records):
            try:
                texts.append(render_prompt(self.tok, record.prompt))
            except Exception as err:  # jinja TemplateError and friends: keep it one line
                roles = "/".join(m["role"] for m in record.prompt)
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise RecordError(
                    f"record {i} (roles {roles}): the tokenizer's chat template failed: {first}"
                ) from None
        return texts, self._ids(texts, special=not self.chat)

    def _responses(self, texts: list[str]) -> list[list[int]]:
        eos = self.tok.eos_token_id
        return [ids + [eos] for ids in self._ids([self.sep + t for t in texts], special=False)]

    def _fit_prompt(self, prompt: list[int], longest: int, stats: TokenStats) -> list[int] | None:
        """Left-truncate `prompt` to fit; None when even one prompt token does not fit."""
        budget = min(self.max_prompt_length, self.max_length - longest)
        if budget < 1:
            stats.skipped += 1
            return None
        if len(prompt) > budget:
            stats.truncated += 1
            return prompt[-budget:]
        return prompt

    def demonstrations(self, records: list[Demonstration], stats: TokenStats) -> list[dict]:
        """Examples {prompt_ids, response_ids (ends with EOS)}."""
        _, prompts = self._prompts(records)
        responses = self._responses([r.response for r in records])
        out = []
        for prompt, response in zip(prompts, responses):
            stats.records += 1
            prompt = self._fit_prompt(prompt, len(response), stats)
            if prompt is not None:
                out.append({"prompt_ids": prompt, "response_ids": response})
        return out

    def comparisons(self, records: list[Comparison], stats: TokenStats) -> list[dict]:
        """Examples {prompt_ids, responses_ids (best first, each ends with EOS), margin}."""
        _, prompts = self._prompts(records)
        flat = self._responses([text for r in records for text in r.responses])
        out, pos = [], 0
        for record, prompt in zip(records, prompts):
            stats.records += 1
            responses = flat[pos : pos + len(record.responses)]
            pos += len(record.responses)
            prompt = self._fit_prompt(prompt, max(len(r) for r in responses), stats)
            if prompt is not None:
                out.append(
                    {"prompt_ids": prompt, "responses_ids": responses, "margin": record.margin}
                )
        return out

    def prompts(self, records: list[PromptRecord], stats: TokenStats) -> list[dict]:
        """Examples {prompt_ids, prompt_text (full rendered prompt), prompt_messages}."""
        texts, prompts = self._prompts(records)
        out = []
        for record, text, prompt in zip(records, texts, prompts):
            stats.records += 1
            prompt = self._fit_prompt(prompt, 0, stats)
            out.append(
                {"prompt_ids": prompt, "prompt_text": text, "prompt_messages": record.prompt}
            )
        return out

    def tokenize(self, kind: str, records: list[Record], stats: TokenStats) -> list[dict]:
        """Dispatch on the kind name."""
        method = {
            "demonstration": self.demonstrations,
            "preference": self.comparisons,
            "prompt": self.prompts,
        }[kind]
        return method(records, stats)
