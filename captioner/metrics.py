"""Caption metrics.

`bleu`: the project's BLEU, nltk's corpus_bleu on `vocab.tokenize` tokens, 0-100 scale
(the training loop's dev score). `coco_caption`: the coco-caption metrics papers report
(pycocoevalcap: PTBTokenizer, BLEU, METEOR, ROUGE-L, CIDEr), which need Java.

The two BLEUs agree to ~1e-9 on the same tokens except in two cases (pinned in
tests/test_evaluate.py), both from pycocoevalcap's bleu_scorer.py:
  - an n-gram order with no match at all: nltk scores 0, pycocoevalcap multiplies in
    1e-15 / (n-gram count) instead, so its BLEU-4 stays a little above 0;
  - a hypothesis shorter than n words: nltk counts max(1, 0) = 1 n-gram of order n
    for it, pycocoevalcap counts 0, so nltk's n-gram precision is a little lower.
Both pick the closest reference length for the brevity penalty and, on a tie, the
shorter reference. Tokenization differs too: PTBTokenizer (Stanford CoreNLP) vs nltk's
Treebank tokenizer, so expect coco BLEU to differ slightly from `bleu` on raw text.

`object_mentions`: whether captions name the objects in the photo, the F1 of DCC (Hendricks et
al. 2016) over every object noun of the tag mapping instead of eight held-out classes.
"""
from __future__ import annotations

import math
import shutil
import warnings
from collections import Counter

from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

from .tags import MAPPING, read_mapping
from .vocab import TOKENIZER, tokenize

_SENTENCE_SMOOTHING = SmoothingFunction().method1
BLEU_WEIGHTS = [(1, 0, 0, 0), (0.5, 0.5, 0, 0), (1 / 3, 1 / 3, 1 / 3, 0), (0.25, 0.25, 0.25, 0.25)]
BLEU_METHOD = f"nltk corpus_bleu, all references, no smoothing; tokens: {TOKENIZER}"
SENTENCE_BLEU_METHOD = f"nltk BLEU of one image, smoothing method1 (epsilon 0.1); tokens: {TOKENIZER}"
COCO_METHOD = ("pycocoevalcap (coco-caption): PTBTokenizer (Stanford CoreNLP 3.4.1, lowercase, punctuation "
               "dropped); BLEU, METEOR 1.5, ROUGE-L, CIDEr-D; 0-100 scale")
SPICE_NOTE = "SPICE skipped: it needs Stanford CoreNLP models downloaded at first use"
COCO_KEYS = ["coco_bleu1", "coco_bleu2", "coco_bleu3", "coco_bleu4", "meteor", "rouge_l", "cider"]


def _corpus_bleu(hypotheses: list[str], references: list[list[str]], smoothing=None) -> dict[str, float]:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    hyps = [tokenize(h) for h in hypotheses]
    refs = [[tokenize(r) for r in rs] for rs in references]
    scores = _nltk_bleu(refs, hyps, BLEU_WEIGHTS, smoothing)
    return {f"bleu{n}": 100 * s for n, s in enumerate(scores, 1)}


def _nltk_bleu(refs, hyps, weights, smoothing):
    with warnings.catch_warnings():  # nltk warns on zero n-gram overlap; a score of 0 is the answer
        warnings.simplefilter("ignore", UserWarning)
        return corpus_bleu(refs, hyps, weights=weights, smoothing_function=smoothing)


def bleu(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 of hypotheses (one string per image) against each image's references."""
    return _corpus_bleu(hypotheses, references)


def sentence_bleu(hypothesis: str, references: list[str]) -> dict[str, float]:
    """BLEU-1..4 of one image, smoothed: unsmoothed sentence BLEU-4 is 0 for most captions."""
    return _corpus_bleu([hypothesis], [references], _SENTENCE_SMOOTHING)


def sentence_bleu4(hypothesis: list[str], references: list[list[str]]) -> float:
    """`sentence_bleu`'s BLEU-4 on 0-1, of text already tokenized: self-critical training's
    reward, computed for every sampled caption (its references are tokenized once)."""
    return _nltk_bleu([references], [hypothesis], BLEU_WEIGHTS[3], _SENTENCE_SMOOTHING)


class CiderD:
    """CIDEr-D of single captions against a fixed reference corpus (0-10 scale, like coco's
    CIDEr before its x100): self-critical training's reward.

    The formula is pycocoevalcap's (tf-idf n-gram vectors, clipped cosine, Gaussian length
    penalty with sigma 6); what differs is where the document frequencies come from.
    pycocoevalcap derives them from the captions it is handed, so a batch of 64 images
    would define its own idf. Here they come once from the whole corpus (all training
    images), as in Rennie et al. 2017. Scored against the same images the two agree.
    """

    def __init__(self, corpus: list[list[list[str]]], n: int = 4, sigma: float = 6.0):
        from pycocoevalcap.cider.cider_scorer import precook  # n-gram counts, as pycocoevalcap makes them

        self._ngrams = lambda words: precook(" ".join(words), n)
        self.n, self.sigma = n, sigma
        self.df = Counter(g for refs in corpus for g in {g for r in refs for g in self._ngrams(r)})
        self.log_images = math.log(len(corpus))
        self.refs = [[self._vector(r) for r in refs] for refs in corpus]

    def _vector(self, words: list[str]):
        vec = [{} for _ in range(self.n)]
        for g, tf in self._ngrams(words).items():
            vec[len(g) - 1][g] = tf * (self.log_images - math.log(max(1.0, self.df[g])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms, max(0, len(words) - 1)  # pycocoevalcap's length: its bigram count

    def score(self, words: list[str], image: int) -> float:
        """CIDEr-D of one tokenized caption against corpus image `image`'s references."""
        vec, norms, length = self._vector(words)
        total = 0.0
        for ref_vec, ref_norms, ref_length in self.refs[image]:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma ** 2))
            for v, r, nv, nr in zip(vec, ref_vec, norms, ref_norms):
                sim = sum(min(w, r.get(g, 0.0)) * r.get(g, 0.0) for g, w in v.items())
                total += penalty * (sim / (nv * nr) if nv and nr else sim)
        return 10 * total / self.n / len(self.refs[image])


def diversity(hypotheses: list[str], training_captions: list[str] | None = None) -> dict[str, float]:
    """How varied the captions are (van Miltenburg et al. 2018, "Measuring the diversity of automatic
    image descriptions"): words used over the set, % distinct captions, % that appear verbatim among
    the training captions (when given), and mean length in words. Optimising BLEU alone shortens
    captions and narrows the vocabulary; these show it where BLEU does not."""
    from .vocab import tokenize

    tokens = [tuple(tokenize(h)) for h in hypotheses]
    r = {"vocab_used": len({w for t in tokens for w in t}),
         "distinct_pct": 100 * len(set(tokens)) / max(1, len(tokens)),
         "mean_length": sum(map(len, tokens)) / max(1, len(tokens))}
    if training_captions is not None:
        seen = {tuple(tokenize(c)) for c in training_captions}
        r["verbatim_train_pct"] = 100 * sum(t in seen for t in tokens) / max(1, len(tokens))
    return r


# Words of the mapping's word sets that captions mostly use in another sense ("a man rides", "can",
# "watches", "an orange shirt", "light brown"): counted, they would be objects nobody named.
NOT_MENTIONS = frozenset({"ride", "rides", "can", "watch", "watches", "fly", "flies", "swing", "swings", "light",
                          "lights", "orange", "cream", "drink", "drinks"})
MENTION_METHOD = ("object mentions, micro-averaged: the nouns of the tag mapping (assets/imagenet_nouns.tsv, "
                  "each with its word set; a two-word name counts as its words in a row) that at least 2 "
                  "references name, against those the caption names; "
                  f"words mostly used in another sense left out ({' '.join(sorted(NOT_MENTIONS))}); "
                  f"tokens: {TOKENIZER}")


def object_nouns(path=MAPPING) -> dict[str, set[str]]:
    """noun -> its word set (e.g. cat -> {cat, cats}), the tag mapping's nouns less `NOT_MENTIONS`:
    the objects mentions count."""
    nouns: dict[str, set[str]] = {}
    for noun, words in read_mapping(path):
        if noun and set(words) - NOT_MENTIONS:
            nouns.setdefault(noun, set()).update(set(words) - NOT_MENTIONS)
    return nouns


def named_forms(text: str, forms) -> set[str]:
    """The word forms of `forms` that a text names: its words, and two-word forms ("tennis_ball") by
    their words in a row, which then name nothing else ("teddy bear" is no bear, when `forms` has
    "teddy_bear"; `named_nouns` looks up every noun's forms at once)."""
    tokens, found, i = tokenize(text), set(), 0
    while i < len(tokens):
        pair = "_".join(tokens[i:i + 2])
        if pair in forms:
            found.add(pair)
            i += 2
            continue
        if tokens[i] in forms:
            found.add(tokens[i])
        i += 1
    return found


def owners(nouns: dict[str, set[str]] | dict[str, list[str]]) -> dict[str, str]:
    """Word form -> its noun, of `nouns` (noun -> its word forms, as object_nouns or Tagger.words):
    made once, read by `named_nouns` for every text."""
    return {w: n for n, words in nouns.items() for w in words}


def named_nouns(text: str, owner: dict[str, str]) -> set[str]:
    """The nouns a text names; `owner` is `owners(nouns)`."""
    return {owner[f] for f in named_forms(text, owner)}


def mention_counts(hypotheses: list[str], references: list[list[str]], nouns: dict[str, set[str]],
                   min_refs: int = 2) -> dict[str, Counter]:
    """Per noun, Counter(hit, predicted, gold) over the images. An image's gold nouns are those that
    at least `min_refs` of its references name (any word of the noun's set); its predicted nouns
    those the hypothesis names; a hit is both."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    owner, counts = owners(nouns), {}  # counts: noun -> Counter
    for hyp, refs in zip(hypotheses, references):
        votes = Counter(n for r in refs for n in named_nouns(r, owner))
        gold = {n for n, v in votes.items() if v >= min_refs}
        predicted = named_nouns(hyp, owner)
        for n in gold | predicted:
            c = counts.setdefault(n, Counter())
            c.update(hit=int(n in gold and n in predicted), predicted=int(n in predicted), gold=int(n in gold))
    return counts


def object_mentions(hypotheses: list[str], references: list[list[str]], nouns: dict[str, set[str]] | None = None,
                    min_refs: int = 2) -> dict[str, float]:
    """Micro-averaged object-mention precision, recall and F1 (0-100) and their counts; see `mention_counts`.
    nouns: noun -> word set, default the tag mapping's (`object_nouns`)."""
    total = Counter(hit=0, predicted=0, gold=0)
    for c in mention_counts(hypotheses, references, object_nouns() if nouns is None else nouns, min_refs).values():
        total.update(c)
    p = 100 * total["hit"] / total["predicted"] if total["predicted"] else 0.0
    r = 100 * total["hit"] / total["gold"] if total["gold"] else 0.0
    return {"mention_precision": p, "mention_recall": r, "mention_f1": 2 * p * r / (p + r) if p + r else 0.0,
            "mention_hits": total["hit"], "mention_predicted": total["predicted"], "mention_gold": total["gold"]}


def java_available() -> bool:
    return shutil.which("java") is not None


def coco_caption(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """coco-caption's BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (0-100), as its COCOEvalCap computes them.

    Starts Java twice (tokenizer, METEOR): seconds of overhead. Raises RuntimeError without Java.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not java_available():
        raise RuntimeError("coco-caption metrics need Java (the `java` command was not found)")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One tokenizer run for hypotheses and references: each run is a JVM start.
    captions = {("hyp", i): [{"caption": h}] for i, h in enumerate(hypotheses)}
    captions |= {("ref", i): [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    tokens = PTBTokenizer().tokenize(captions)
    if tokens.keys() != captions.keys():
        raise RuntimeError("PTBTokenizer returned a different number of captions than it was given")
    res = {i: tokens[("hyp", i)] for i in range(len(hypotheses))}
    gts = {i: tokens[("ref", i)] for i in range(len(references))}
    bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(gts, res)
    finally:
        del meteor  # stops its JVM
    scores = [*bleus, meteor_score, Rouge().compute_score(gts, res)[0], Cider().compute_score(gts, res)[0]]
    return {k: 100 * float(s) for k, s in zip(COCO_KEYS, scores)}
