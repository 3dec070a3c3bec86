"""Caption metrics. BLEU is nltk's corpus_bleu on `vocab.tokenize` tokens, 0-100 scale."""
from __future__ import annotations

import warnings

from nltk.translate.bleu_score import corpus_bleu

from .vocab import TOKENIZER, tokenize

BLEU_WEIGHTS = [(1, 0, 0, 0), (0.5, 0.5, 0, 0), (1 / 3, 1 / 3, 1 / 3, 0), (0.25, 0.25, 0.25, 0.25)]
BLEU_METHOD = f"nltk corpus_bleu, all references, no smoothing; tokens: {TOKENIZER}"


def bleu(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 of hypotheses (one string per image) against each image's references."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    hyps = [tokenize(h) for h in hypotheses]
    refs = [[tokenize(r) for r in rs] for rs in references]
    with warnings.catch_warnings():  # nltk warns on zero n-gram overlap; a score of 0 is the answer
        warnings.simplefilter("ignore", UserWarning)
        scores = corpus_bleu(refs, hyps, weights=BLEU_WEIGHTS)
    return {f"bleu{n}": 100 * s for n, s in enumerate(scores, 1)}
