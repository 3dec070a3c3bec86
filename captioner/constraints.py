"""Word constraints for guided decoding: which tags a caption must name, as a small state machine.

Constrained beam search (Anderson et al., EMNLP 2017): the image's confident tags become
disjunctive constraints ({cat, cats}), and the search keeps one beam per state of a finite-state
machine over "which constraints are met". A caption counts once it meets `required` of them.

The machine here has, per image:
- one state per set of met constraints smaller than `required`; state 0, the empty set, is where
  every caption starts, and its beams are the best captions that name no constraint;
- one ACCEPTING state for every set of at least `required`. Ranked by a bonus per constraint, sets
  of the same size are worth different amounts, so guidance asks for all of its tags
  (required = guide_max): then every set has its own state and ACCEPTING is all of them.
With no constraints there is only state 0, which is plain beam search. The search ranks the
finished captions of every state together (search.beam_search's bonus), so a caption that names
no tag still wins where the ones that do read much worse.
torch-free: the runtime builds the same machine.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# Nouns never asked for: on the development photos (Flickr8k dev, 80 COCO photos), captions that
# named them only because of guidance lost 10 or more CIDEr-D points on average over at least 3
# photos (scripts/guide_stop_list.py). Most tag a part or a near miss of what the references name:
# "unicycle" on bicycles, "paddle" and "canoe" on kayaks, "pole" on whatever stands beside one.
STOP = frozenset({"camel", "canoe", "cart", "handrail", "motorbike", "paddle", "parachute", "pole", "unicycle"})


@dataclass(frozen=True)
class Machine:
    """One image's state machine. moves[(state, word)] = next state, only where a word moves it."""

    states: int
    accepting: int | None  # the accepting state (None without constraints)
    moves: dict[tuple[int, int], int]


def choose(noun_probs: np.ndarray, nouns: list[str], words: dict[str, list[str]], vocab_ids: dict[str, int], *,
           threshold: float, most: int, stop=STOP, kin: dict[str, frozenset[str]] | None = None
           ) -> list[tuple[tuple[int, ...], float]]:
    """One image's constraints: its likeliest nouns of at least `threshold`, at most `most` constraints, each
    as (the word ids of its forms that the vocabulary has, its probability); a noun it cannot write is
    skipped. A noun that is kin of any noun of a chosen constraint (`kin`, tags.read_kin: "boat" for
    "ship") joins it, words and probability, so a constraint may grow along a chain (canoe, boat,
    ship): the classifier's doubt between near kinds is about one object, which a caption names once
    ("a boat in the water", not "a ship in a boat")."""
    kin = kin or {}
    out, owners = [], []  # owners: per constraint, its nouns
    for i in np.argsort(-noun_probs, kind="stable"):
        if noun_probs[i] < threshold:
            break
        ids = tuple(sorted({vocab_ids[w] for w in words.get(nouns[i], ()) if w in vocab_ids}))
        if nouns[i] in stop or not ids:
            continue
        c = next((c for c, owner in enumerate(owners) if kin.get(nouns[i], frozenset()) & owner), None)
        if c is not None:
            out[c] = (tuple(sorted(set(out[c][0]) | set(ids))), out[c][1] + float(noun_probs[i]))
            owners[c].add(nouns[i])
        elif len(out) < most:
            out.append((ids, float(noun_probs[i])))
            owners.append({nouns[i]})
    return out


def machine(constraints: list[tuple[int, ...]], required: int = 2) -> Machine:
    """The state machine of one image's constraints; a caption is accepted once it meets
    min(required, len(constraints)) of them."""
    n = len(constraints)
    if n == 0:
        return Machine(1, None, {})
    need = min(required, n)
    partial = [frozenset(c) for size in range(need) for c in itertools.combinations(range(n), size)]
    index = {met: i for i, met in enumerate(partial)}  # by size: a word only ever moves to a later state
    accepting = len(partial)
    moves = {}
    for met, state in index.items():
        for word in sorted({w for ids in constraints for w in ids}):
            after = met | {c for c, ids in enumerate(constraints) if word in ids}  # a word may meet two
            if after != met:
                moves[(state, word)] = accepting if len(after) >= need else index[after]
    return Machine(accepting + 1, accepting, moves)
