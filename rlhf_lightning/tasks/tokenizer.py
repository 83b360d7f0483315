"""A tiny word-level tokenizer built from a corpus, for offline tests and the quickstart.

Real runs use the policy's own tokenizer (hub id, local dir or GGUF). For the
embedded task we need a tokenizer that exists without any download, so we build
a `tokenizers` WordLevel model whose vocabulary is every word and punctuation
mark seen in the task's corpus, wrapped in `PreTrainedTokenizerFast` so that it
behaves like any Hugging Face tokenizer (`save_pretrained`, `apply_chat_template`,
padding side, special tokens).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)

# A minimal chat template (Jinja, as transformers expects) so the chat-template code
# path is exercised offline. Turns look like "<s>user: text\n" ... "assistant:".
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def corpus_words(texts: Iterable[str]) -> list[str]:
    """Sorted unique pre-tokens (words and punctuation) of `texts`."""
    splitter = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in texts:
        words.update(piece for piece, _ in splitter.pre_tokenize_str(text))
    return sorted(words)


def build_word_tokenizer(
    texts: Iterable[str], *, chat_template: bool = False, extra_words: Iterable[str] = ()
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the words of `texts` (+ `extra_words`).

    Special tokens: `<pad>`=0, `<unk>`=1, `<s>`=2, `</s>`=3. With `chat_template=True`
    the tokenizer carries `CHAT_TEMPLATE`, otherwise it has none (the plain-template path).
    """
    words = corpus_words(list(texts) + list(extra_words) + ["user", "assistant", ":"])
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
