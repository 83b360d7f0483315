"""The embedded sentiment task: determinism, vocabulary coverage, and VADER's ranking of it."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from rlhf_lightning.data.records import parse_record
from rlhf_lightning.tasks import sentiment


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _spearman(x: list[float], y: list[float]) -> float:
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx) ** 0.5
    vy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (vx * vy)


def test_prepare_is_deterministic_and_complete(tmp_path):
    a = sentiment.prepare(tmp_path / "a", seed=3, num_train=50, num_val=10, num_prompts=20)
    b = sentiment.prepare(tmp_path / "b", seed=3, num_train=50, num_val=10, num_prompts=20)
    c = sentiment.prepare(tmp_path / "c", seed=4, num_train=50, num_val=10, num_prompts=20)
    for name in ("sft_train", "sft_val", "prompts"):
        assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes()
    assert a.sft_train.read_bytes() != c.sft_train.read_bytes()
    rows = [json.loads(line) for line in a.sft_train.read_text().splitlines()]
    assert len(rows) == 50 and {r["level"] for r in rows} == {-2, -1, 0, 1, 2}
    prompts = [json.loads(line) for line in a.prompts.read_text().splitlines()]
    assert len(prompts) == 20 and all(set(p) == {"prompt"} for p in prompts)
    for i, row in enumerate(rows[:5]):
        record = parse_record(row, "demonstration", f"sft_train.jsonl:{i + 1}")
        assert record.response == row["response"]
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    assert tok.chat_template and tok.eos_token == "</s>"


def test_tokenizer_covers_every_generated_word(tmp_path):
    tok = sentiment.build_word_tokenizer(sentiment.vocabulary_texts(), chat_template=True)
    rows = sentiment.demonstrations(400, seed=1) + sentiment.prompts(100, seed=2)
    text = " ".join(r["prompt"] + " " + r.get("response", "") for r in rows)
    assert tok.unk_token_id not in tok(text).input_ids
    assert 100 < len(tok) < 400  # "a few hundred words"


def test_vader_ranks_the_sentiment_levels():
    rows = sentiment.demonstrations(500, seed=0)
    levels = [r["level"] for r in rows]
    scores = [sentiment.vader_score(r["prompt"], r["response"]) for r in rows]
    means = [
        sum(s for s, lv in zip(scores, levels) if lv == level) / levels.count(level)
        for level in range(-2, 3)
    ]
    assert means == sorted(means) and means[0] < -0.5 and means[-1] > 0.5
    assert _spearman(levels, scores) > 0.7
    # a spread for the later stages to work with: clearly negative and clearly positive reviews
    assert sum(s < -0.5 for s in scores) > 100 and sum(s > 0.5 for s in scores) > 100
    assert len(set(scores)) > 150  # few ties, so rankings are informative


def test_vader_score_basics():
    good = sentiment.vader_score("p", "the acting was wonderful . i loved it .")
    bad = sentiment.vader_score("p", "the acting was terrible . a waste of time .")
    assert -1.0 <= bad < 0.0 < good <= 1.0
    assert sentiment.vader_score("p", "   ") == -1.0


def test_titles_and_aspects_carry_no_sentiment():
    lexicon = sentiment._analyzer().lexicon
    neutral = sentiment.TITLE_ADJECTIVES + sentiment.TITLE_NOUNS + sentiment.ASPECTS
    assert [w for w in neutral if w in lexicon] == []
    for polarity in (-2, -1, 1, 2):  # graded banks: every word in VADER with the right sign
        assert all(lexicon.get(w, 0) * polarity > 0 for w in sentiment.ADJECTIVES[polarity])


def test_gold_score_is_vader_for_fluent_reviews_and_penalises_repetition():
    from rlhf_lightning.tasks.sentiment import (
        REPETITION_TOLERANCE,
        demonstrations,
        gold_score,
        repeated_bigram_fraction,
        vader_score,
    )

    fluent = [d["response"] for d in demonstrations(300, seed=1)]
    assert all(repeated_bigram_fraction(r) <= REPETITION_TOLERANCE for r in fluent)
    assert all(gold_score("p", r) == vader_score("p", r) for r in fluent)
    hacked = (
        "i loved it excellent . i loved it excellent . i was excellent . i loved it excellent ."
    )
    assert repeated_bigram_fraction(hacked) > 0.5
    assert vader_score("p", hacked) > 0.9 and gold_score("p", hacked) < 0.0
    assert repeated_bigram_fraction("a b a b") == 1 - 2 / 3 and repeated_bigram_fraction("a") == 0.0
