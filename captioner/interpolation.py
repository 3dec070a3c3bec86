"""Weight interpolation between a starting model and its fine-tuning (WiSE-FT, Wortsman et al.,
CVPR 2022), and the rule that chooses how far along the line to go.

A point alpha is the decoder (1 - alpha) * start + alpha * fine-tuned, weight by weight: 0 is the
starting model, 1 the fine-tuned one. Fine-tuning from one start stays in one basin, so the points
between decode sensibly and trade the new domain against the old smoothly.

New vocabulary rows (the embedding, output row and output bias of the words the fine-tuning added)
have no value of their own in the starting model: there they are copies of `<unk>`'s
(`finetune.grow_vocabulary`), which carry no knowledge of the word. Every point keeps their
fine-tuned values unscaled: the new words exist for the new domain, and scaling them back towards
`<unk>` would only make them rarer at the same cost on the old side. The old words' rows are
interpolated like every other weight, so their ids never move and at alpha 0 their rows are the
starting model's, bit for bit.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

VOCAB_ROWS = ("embed.weight", "out.weight", "out.bias")  # the decoder's tensors with one row per word
ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CIDER_PER_BLEU = 3.0  # a forgetting budget of B BLEU-4 points allows B times this many CIDEr-D points


def interpolate(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float,
                n_old: int) -> dict[str, torch.Tensor]:
    """The decoder weights at `alpha` (0: `start`, 1: `tuned`); rows from `n_old` on of the vocabulary
    tensors (the new words) are `tuned`'s."""
    mixed = {}
    for name, s in start.items():
        t = tuned[name]
        if not s.is_floating_point():
            mixed[name] = t
            continue
        m = torch.lerp(s, t, alpha)
        if name in VOCAB_ROWS:
            m[n_old:] = t[n_old:]
        mixed[name] = m
    return mixed


@dataclass
class Point:
    alpha: float
    new: dict[str, float]  # scores on the new validation data
    old: dict[str, float] | None = None  # scores on the starting model's dev data (None: not measured)


def forgetting(old: dict[str, float], before: dict[str, float]) -> tuple[float, float]:
    """(BLEU-4 drop, CIDEr-D drop) on the old data, in points."""
    return before["bleu4"] - old["bleu4"], before["cider"] - old["cider"]


def within(old: dict[str, float], before: dict[str, float], budget: float) -> bool:
    bleu_drop, cider_drop = forgetting(old, before)
    return bleu_drop <= budget and cider_drop <= budget * CIDER_PER_BLEU


def choose(points: list[Point], score_old: Callable[[float], dict[str, float]], before: dict[str, float],
           budget: float) -> Point | None:
    """The point with the best new-domain CIDEr-D whose old-data BLEU-4 drop is at most `budget` and
    CIDEr-D drop at most `budget * CIDER_PER_BLEU`; None when no point is within the budget.

    The old data is scored (`score_old(alpha)`, the costly part) only where it can decide: points in
    order of new-domain CIDEr-D, best first, until one is within the budget."""
    for p in sorted(points, key=lambda p: (-p.new["cider"], p.alpha)):
        if p.old is None:
            p.old = score_old(p.alpha)
        if within(p.old, before, budget):
            return p
    return None
