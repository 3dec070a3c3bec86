"""Vocabulary and tokenization.

Tokenization is nltk's TreebankWordTokenizer (rule-based, needs no downloaded
data) on lowercased text; tokens with no letter or digit (punctuation) are
dropped, as in the usual caption preprocessing. The same `tokenize` is used for
training captions and for BLEU, so scores and training see the same words.
"""
from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # PAD is index 0
TOKENIZER = "nltk.TreebankWordTokenizer, lowercase, punctuation dropped"

@functools.cache
def _treebank():
    # nltk loads on first use: decoding ids to words (the torch-free runtime) needs no tokenizer.
    from nltk.tokenize import TreebankWordTokenizer

    return TreebankWordTokenizer()


def tokenize(text: str) -> list[str]:
    return [t for t in _treebank().tokenize(text.lower()) if any(c.isalnum() for c in t)]


def _frequent(captions: Iterable[str], min_count: int) -> list[str]:
    counts = Counter(t for c in captions for t in tokenize(c))
    # Sorted by frequency, then alphabetically, so the same data gives the same ids.
    return sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))


class Vocab:
    def __init__(self, words: Iterable[str]):
        words = [w for w in words if w not in SPECIALS]
        self.itos: list[str] = list(SPECIALS) + words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary has duplicate words")

    pad, start, end, unk = 0, 1, 2, 3
    banned = (pad, start, unk)  # what a generated caption may never contain (every search and sampler)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocab:
        return cls(_frequent(captions, min_count))

    def extend(self, captions: Iterable[str], min_count: int = 5) -> Vocab:
        """This vocabulary plus the words of `captions` seen at least min_count times that it lacks,
        appended: every existing word keeps its id."""
        return Vocab(self.itos + [w for w in _frequent(captions, min_count) if w not in self.stoi])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str | list[str], max_len: int | None = None) -> list[int]:
        """`<start> w1 .. wn <end>` as ids; text is tokenized, a token list is used as is."""
        tokens = tokenize(text) if isinstance(text, str) else text
        if max_len is not None:
            tokens = tokens[:max_len]
        return [self.start] + [self.stoi.get(t, self.unk) for t in tokens] + [self.end]

    def decode(self, ids: Iterable[int]) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i not in (self.pad, self.start):
                words.append(self.itos[i])
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"itos": list(self.itos), "tokenizer": TOKENIZER}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        itos = d["itos"]
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        return cls(itos[len(SPECIALS):])
