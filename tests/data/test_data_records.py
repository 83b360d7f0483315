"""Parsing of every accepted record layout, and the one-line errors for malformed rows."""

from __future__ import annotations

import pytest

from rlhf_lightning.data.records import (
    Comparison,
    Demonstration,
    PromptRecord,
    RecordError,
    hh_messages,
    parse_record,
)

W = "train.jsonl:7"


def user(text):
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------ demonstrations
def test_prompt_response_and_trl_completion():
    assert parse_record({"prompt": "hi", "response": "yo"}, "demonstration", W) == Demonstration(
        user("hi"), "yo"
    )
    assert parse_record({"prompt": "hi", "completion": "yo"}, "demonstration", W) == Demonstration(
        user("hi"), "yo"
    )
    conversational = {"prompt": user("hi"), "completion": [{"role": "assistant", "content": "yo"}]}
    assert parse_record(conversational, "demonstration", W) == Demonstration(user("hi"), "yo")


def test_messages_split_at_last_assistant_turn():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    record = parse_record({"messages": messages}, "demonstration", W)
    assert record.prompt == messages[:4]
    assert record.response == "d"


def test_alpaca_fields_with_and_without_input():
    with_input = {"instruction": "Sort these", "input": "b, a", "output": "a, b"}
    assert parse_record(with_input, "demonstration", W) == Demonstration(
        user("Sort these\n\nb, a"), "a, b"
    )
    no_input = {"instruction": "Say hi", "input": "", "output": "hi"}
    assert parse_record(no_input, "demonstration", W) == Demonstration(user("Say hi"), "hi")


def test_preference_layout_read_as_demonstration_uses_best_response():
    raw = {"prompt": "q", "responses": ["best", "mid", "worst"]}
    assert parse_record(raw, "demonstration", W) == Demonstration(user("q"), "best")


def test_field_map_renames_columns_and_errors_name_the_users_column():
    fields = {"prompt": "question", "response": "answer"}
    raw = {"question": "why?", "answer": "because"}
    assert parse_record(raw, "demonstration", W, fields) == Demonstration(user("why?"), "because")
    with pytest.raises(RecordError, match=r"^train.jsonl:7: field 'answer' is an empty response$"):
        parse_record({"question": "why?", "answer": " "}, "demonstration", W, fields)


# --------------------------------------------------------------------- preferences
def test_pair_with_margin_and_ranking():
    pair = {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 2}
    assert parse_record(pair, "preference", W) == Comparison(user("q"), ("good", "bad"), 2.0)
    ranking = {"prompt": "q", "responses": ["a", "b", "c"]}
    assert parse_record(ranking, "preference", W) == Comparison(user("q"), ("a", "b", "c"), None)


def test_hh_transcripts_split_into_multi_turn_messages():
    prefix = "\n\nHuman: hello\n\nAssistant: hi there\n\nHuman: tell me a joke"
    raw = {
        "chosen": prefix + "\n\nAssistant: a funny one",
        "rejected": prefix + "\n\nAssistant: no",
    }
    record = parse_record(raw, "preference", W)
    assert record.prompt == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "tell me a joke"},
    ]
    assert record.responses == ("a funny one", "no")
    assert parse_record(raw, "prompt", W) == PromptRecord(record.prompt)
    assert parse_record(raw, "demonstration", W) == Demonstration(record.prompt, "a funny one")


def test_hh_split_uses_the_prefix_shared_by_both_transcripts():
    # The chosen response itself contains "\n\nAssistant:"; the cut must stay in the shared prefix.
    prefix = "\n\nHuman: list artists"
    raw = {
        "chosen": prefix + "\n\nAssistant: one\n\nAssistant: two",
        "rejected": prefix + "\n\nAssistant: none",
    }
    record = parse_record(raw, "preference", W)
    assert record.prompt == user("list artists")
    assert record.responses == ("one\n\nAssistant: two", "none")


def test_implicit_prompt_message_lists():
    prompt = user("q")
    raw = {
        "chosen": prompt + [{"role": "assistant", "content": "good"}],
        "rejected": prompt + [{"role": "assistant", "content": "bad"}],
    }
    assert parse_record(raw, "preference", W) == Comparison(prompt, ("good", "bad"))


def test_prompt_kind_from_every_layout():
    assert parse_record({"prompt": "p"}, "prompt", W) == PromptRecord(user("p"))
    msgs = user("a") + [{"role": "assistant", "content": "b"}]
    assert parse_record({"messages": msgs}, "prompt", W) == PromptRecord(user("a"))
    assert parse_record({"messages": user("open")}, "prompt", W) == PromptRecord(user("open"))
    assert parse_record({"instruction": "i", "output": "o"}, "prompt", W) == PromptRecord(user("i"))


def test_hh_messages_keeps_turn_order():
    assert [m["role"] for m in hh_messages("\n\nHuman: a\n\nAssistant: b\n\nHuman: c")] == [
        "user",
        "assistant",
        "user",
    ]


# ------------------------------------------------------------------------ errors
BAD = [
    ({"prompt": "q", "rejected": "b"}, "preference", "field 'chosen' is missing"),
    ({"prompt": "q", "chosen": "a"}, "preference", "field 'rejected' is missing"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "preference", "field 'chosen' must be a string (got int)"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "preference", "field 'rejected' is an empty response"),
    ({"prompt": "q", "responses": ["only"]}, "preference", "field 'responses' needs at least 2 responses (got 1)"),
    ({"prompt": "q", "responses": "a"}, "preference", "field 'responses' must be a list of responses (got str)"),
    ({"prompt": "q", "responses": ["a", ""]}, "preference", "field 'responses[1]' is an empty response"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": True}, "preference", "field 'margin' must be a finite number (got True)"),
    ({"chosen": "no turns", "rejected": "here"}, "preference", "field 'chosen' has no '\\n\\nAssistant:' turn shared with 'rejected' (add a 'prompt' field)"),
    ({"prompt": 5, "response": "r"}, "demonstration", "field 'prompt' must be a string or a list of chat messages (got int)"),
    ({"prompt": "q", "response": ""}, "demonstration", "field 'response' is an empty response"),
    ({"prompt": "q"}, "demonstration", "field 'response' is missing"),
    ({"prompt": ""}, "prompt", "field 'prompt' is empty"),
    ({"messages": user("q")}, "demonstration", "field 'messages' must end with an assistant turn"),
    ({"messages": [{"role": "user"}]}, "demonstration", "field 'messages' item 0 needs string 'role' and 'content'"),
    ({"instruction": "i", "output": ""}, "demonstration", "field 'output' is an empty response"),
    ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}] * 2}, "demonstration", "field 'completion' must be a string or a single assistant message (got a list of 2)"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "response": "r"}, "demonstration", "field 'prompt' must not end with an assistant turn"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "preference", "field 'rejected' has a different conversation before its last turn than 'chosen'"),
    ({"prompt": "q", "chosen": "same", "rejected": " same\n"}, "preference", "field 'rejected' is identical to 'chosen' (no preference)"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: same", "rejected": "\n\nHuman: q\n\nAssistant:  same "}, "preference", "field 'rejected' is identical to 'chosen' (no preference)"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a "}]}, "preference", "field 'rejected' is identical to 'chosen' (no preference)"),
    ({"prompt": "q", "responses": ["a", "a", "b"]}, "preference", "field 'responses[1]' is identical to 'responses[0]' (a response cannot rank above itself)"),
    ({"prompt": "q", "responses": ["a", "b", "c", " b"]}, "preference", "field 'responses[3]' is identical to 'responses[1]' (a response cannot rank above itself)"),
]  # fmt: skip


@pytest.mark.parametrize("raw, kind, problem", BAD)
def test_bad_rows_give_one_line_errors(raw, kind, problem):
    with pytest.raises(RecordError) as info:
        parse_record(raw, kind, W)
    assert str(info.value) == f"{W}: {problem}"
    assert "\n" not in str(info.value)


def test_unrecognised_layout_and_non_object():
    with pytest.raises(RecordError) as info:
        parse_record({"text": "x"}, "preference", "d.parquet:row 3")
    assert str(info.value).startswith("d.parquet:row 3: no preference fields: expected ")
    assert str(info.value).endswith("(found: 'text')")
    with pytest.raises(RecordError, match=r"^d.json:row 0: expected a JSON object \(got list\)$"):
        parse_record([1, 2], "prompt", "d.json:row 0")
    with pytest.raises(ValueError, match="unknown data kind 'sft'"):
        parse_record({}, "sft", W)


def test_identical_responses_name_the_users_columns_and_still_make_a_demonstration():
    fields = {"chosen": "good", "rejected": "bad"}
    raw = {"prompt": "q", "good": "same", "bad": "same"}
    with pytest.raises(RecordError, match=r"^train.jsonl:7: field 'bad' is identical to 'good' "):
        parse_record(raw, "preference", W, fields)
    # As a demonstration only the best response is used, so the repeat does not matter.
    assert parse_record(raw, "demonstration", W, fields) == Demonstration(user("q"), "same")
    ranking = {"prompt": "q", "responses": ["a", "a"]}
    assert parse_record(ranking, "demonstration", W) == Demonstration(user("q"), "a")
    assert parse_record(ranking, "prompt", W) == PromptRecord(user("q"))
