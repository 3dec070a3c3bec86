"""Which tags guidance should never ask for: constraints.STOP, measured on the development photos.

    python scripts/guide_stop_list.py            # per noun: photos, summed and mean CIDEr-D change

Decodes COCO mini and Flickr8k dev guided with no stop list and unguided (the model's defaults
otherwise), and credits each photo's CIDEr-D change to the tags its guided caption names and its
unguided one does not. A noun is on the list when that change averages -10 points or worse over at
least 3 photos. Prints each data set's scores without a stop list, every noun with a change, worst
first, then the list. Development photos only.
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
from tune_guidance import DATASETS, features, score

from captioner import Captioner, metrics
from captioner.evaluate import decode_features
from captioner.search import beam_search
from captioner.vocab import tokenize

MIN_PHOTOS, MAX_MEAN = 3, -10.0


def guided_without_stop(cap: Captioner, feats) -> list[str]:
    o = cap.options()
    found = cap.tagger.constraints(feats.numpy(), cap.vocab.stoi, threshold=o.guide_threshold, most=o.guide_max,
                                   stop=frozenset())
    hyps = beam_search(cap.decoder, feats, start=cap.vocab.start, end=cap.vocab.end, beam_size=o.beam_size,
                       max_len=o.max_len, length_penalty=o.length_penalty, alpha=o.alpha, banned=cap.vocab.banned,
                       constraints=[[ids for ids, _ in c] for c in found], required=o.guide_max,
                       bonus=[[o.guide_weight * p for _, p in c] for c in found])
    return [cap.vocab.decode(h[0].tokens) for h in hyps]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the shipped model")
    p.add_argument("--cache", type=Path, default=Path("/tmp/captioner_tune_guidance"))
    args = p.parse_args()
    cap = Captioner.load(args.checkpoint, device="cpu")
    change, owner = collections.defaultdict(list), metrics.owners(cap.tagger.words)
    for name in DATASETS:
        feats, refs = features(cap, name, args.cache)
        on, off = guided_without_stop(cap, feats), decode_features(cap, feats, options=cap.options(guide="off"))
        cider = metrics.CiderD([[tokenize(r) for r in rs] for rs in refs])
        r = score(on, refs, {})
        print(f"{name}, guided with no stop list: CIDEr-D {r['cider']:.2f}, BLEU-4 {r['bleu4']:.2f}, "
              f"object-mention F1 {r['mention_f1']:.2f}")
        for b, (tags, h1, h0) in enumerate(zip(cap.tag_features(feats), on, off)):
            if h1 != h0:
                d = 100 * (cider.score(tokenize(h1), b) - cider.score(tokenize(h0), b))
                said, before = (metrics.named_nouns(h, owner) for h in (h1, h0))
                for t in tags:
                    if t["tag"] in said - before:
                        change[t["tag"]].append(d)
    print("| noun | photos | CIDEr-D change, sum | mean |\n|---|---|---|---|")
    for noun, ds in sorted(change.items(), key=lambda kv: sum(kv[1])):
        print(f"| {noun} | {len(ds)} | {sum(ds):.1f} | {np.mean(ds):.1f} |")
    stop = sorted(n for n, ds in change.items() if len(ds) >= MIN_PHOTOS and np.mean(ds) <= MAX_MEAN)
    print("stop list:", " ".join(stop))


if __name__ == "__main__":
    main()
