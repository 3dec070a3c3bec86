"""Tags: the encoder's own ImageNet-1k classifier, read as the everyday nouns captions use.

The classifier is EfficientNet-Lite's pretrained `_fc`, applied to the pooled features v the
captioner already computes, so tags cost one (1280 x 1000) product per image and no second pass.
The shipped encoder's top block is fine-tuned for captioning; the pretrained head on its features
keeps the pretrained net's top-1 class on 88-90% of photos and all 6 demo photos, and is more
confident (scripts/compare_tag_heads.py). Class probabilities are summed per noun of
assets/imagenet_nouns.tsv (made by scripts/make_imagenet_nouns.py, docs/guidance.md); classes
without a noun are left out. numpy only: the torch-free runtime tags with this module too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .constraints import STOP, choose

MAPPING = Path(__file__).parent / "assets" / "imagenet_nouns.tsv"
TOP, MIN_PROB = 5, 0.05  # the keywords shown: at most TOP nouns, each at least MIN_PROB


def _rows(path: str | Path) -> list[list[str]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if lines[0].split("\t") != ["index", "wnid", "name", "noun", "words", "kin"]:
        raise ValueError(f"{path} is not an ImageNet noun mapping")
    return [line.split("\t") for line in lines[1:]]


def read_mapping(path: str | Path = MAPPING) -> list[tuple[str, list[str]]]:
    """Per ImageNet class, in index order: (noun or "", its constraint words)."""
    return _mapping(_rows(path))


def read_kin(path: str | Path = MAPPING) -> dict[str, frozenset[str]]:
    """Noun -> its kin, the nouns that name the same kind of thing ("boat" -> canoe, sailboat, ship):
    constraints.choose makes them one constraint."""
    return _kin(_rows(path))


def _mapping(rows: list[list[str]]) -> list[tuple[str, list[str]]]:
    return [(r[3], r[4].split()) for r in rows]


def _kin(rows: list[list[str]]) -> dict[str, frozenset[str]]:
    return {r[3]: frozenset(filter(None, r[5].split(","))) for r in rows if r[3]}


@dataclass
class Tagger:
    weight: np.ndarray  # (classes, dim): the classifier
    bias: np.ndarray  # (classes,)
    nouns: list[str]  # per class, "" for a dropped one
    regions: int = 1  # feature rows per image: an attention model's are region vectors, whose mean is v
    words: dict[str, list[str]] = field(default_factory=dict)  # per noun, its forms (constraint words)
    kin: dict[str, frozenset[str]] = field(default_factory=dict)  # per noun, the nouns of its kind (read_kin)

    def __post_init__(self):
        self.weight, self.bias = np.asarray(self.weight, np.float32), np.asarray(self.bias, np.float32)
        if len(self.nouns) != len(self.bias):
            raise ValueError(f"the mapping has {len(self.nouns)} classes, the classifier {len(self.bias)}")
        self.vocabulary = sorted({n for n in self.nouns if n})
        index = {n: i for i, n in enumerate(self.vocabulary)}
        # (classes, nouns) 0/1 matrix: class probabilities summed per noun in one product.
        self._to_nouns = np.zeros((len(self.nouns), len(self.vocabulary)), np.float32)
        for c, n in enumerate(self.nouns):
            if n:
                self._to_nouns[c, index[n]] = 1.0

    @classmethod
    def from_mapping(cls, weight, bias, regions: int = 1, path: str | Path = MAPPING) -> Tagger:
        rows = _rows(path)  # read once: the runtime builds its tagger at start-up
        mapping = _mapping(rows)
        return cls(weight, bias, [noun for noun, _ in mapping], regions, {noun: ws for noun, ws in mapping if noun},
                   _kin(rows))

    def noun_probs(self, feats) -> np.ndarray:
        """Features (B, width) -> (B, len(vocabulary)) noun probabilities."""
        feats = np.asarray(feats, np.float32)
        pooled = feats.reshape(len(feats), self.regions, -1).mean(axis=1)
        logits = pooled @ self.weight.T + self.bias
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (probs / probs.sum(axis=1, keepdims=True)) @ self._to_nouns

    def constraints(self, feats, vocab_ids: dict[str, int], *, threshold: float, most: int,
                    stop=STOP) -> list[list[tuple]]:
        """Per image, its guidance constraints (constraints.choose): (word-id set, probability) pairs."""
        return [choose(row, self.vocabulary, self.words, vocab_ids, threshold=threshold, most=most, stop=stop,
                       kin=self.kin) for row in self.noun_probs(feats)]

    def __call__(self, feats, top: int = TOP, min_prob: float = MIN_PROB) -> list[list[dict]]:
        """Per image, [{"tag": noun, "prob": p}, ...]: its `top` likeliest nouns of at least min_prob."""
        out = []
        for row in self.noun_probs(feats):
            best = np.argsort(-row, kind="stable")[:top]
            out.append([{"tag": self.vocabulary[i], "prob": round(float(row[i]), 4)} for i in best
                        if row[i] >= min_prob])
        return out
