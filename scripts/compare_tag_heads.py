"""Does the pretrained ImageNet head still read the shipped encoder's features right?

The shipped encoder's top block is fine-tuned for captioning, while its classifier (`_fc`) stays the
pretrained one. This prints, on real photos, how often the head on the shipped features agrees with
the untouched pretrained network, by top-1 class and by top noun (the tags), how confident each is,
and, where the photos have captions, how often each one's top noun is named by a reference caption
(one of the noun's words in at least one reference: which head is right, not only whether they agree).

    python scripts/compare_tag_heads.py                       # Flickr8k dev, coco_mini_train, demo photos
    python scripts/compare_tag_heads.py --limit 200           # quicker
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from captioner import metrics
from captioner.data import load_coco, load_flickr8k
from captioner.encoders import build_encoder
from captioner.inference import Captioner, imagenet_tagger

ROOT = Path(__file__).resolve().parents[1]
SETS = {
    "flickr8k dev": ROOT.parent / "shared/data/flickr8k",
    "coco_mini_train": ROOT.parent / "shared/data/coco_mini_train",
    "demo": ROOT / "demo/examples",
}


def photos(name: str, root: Path, limit: int) -> tuple[list[Path], list[list[str]] | None]:
    """The set's photos and, where it has them, each photo's reference captions."""
    if name == "flickr8k dev":
        examples = load_flickr8k(root, "dev")[:limit]
    elif name == "coco_mini_train":
        examples = load_coco(root / "captions_train2017.json", root / "train2017")[:limit]
    else:
        return sorted(root.glob("*.jpg"))[:limit], None
    return [e.path for e in examples], [e.captions for e in examples]


def named_rate(nouns: np.ndarray, tagger, refs: list[list[str]]) -> float:
    """How often a photo's top noun has one of its words in at least one reference."""
    owner = metrics.owners(tagger.words)
    hits = [any(tagger.vocabulary[n] in metrics.named_nouns(r, owner) for r in rs) for n, rs in zip(nouns, refs)]
    return round(float(np.mean(hits)), 3)


@torch.inference_mode()
def features(encoder, paths: list[Path], batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(paths), batch):
        out.append(encoder(torch.stack([encoder.preprocess(p) for p in paths[i:i + batch]])).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=1000, help="photos per set at most")
    args = ap.parse_args()
    torch.set_num_threads(2)
    shipped = Captioner.load(engine="torch")
    pretrained = build_encoder(shipped.encoder.name).eval()
    tagger = imagenet_tagger(shipped.encoder)
    rows = []
    for name, root in SETS.items():
        if not root.exists():
            print(f"{name}: {root} not found, skipped")
            continue
        paths, refs = photos(name, root, args.limit)
        ours, theirs = features(shipped.encoder.eval(), paths), features(pretrained, paths)

        def logits(f):
            return f @ tagger.weight.T + tagger.bias

        def top_noun(f):
            return tagger.noun_probs(f).argmax(1)

        def top_prob(f):
            z = logits(f)
            p = np.exp(z - z.max(1, keepdims=True))
            return (p / p.sum(1, keepdims=True)).max(1).mean()

        rows.append({"set": name, "photos": len(paths),
                     "top-1 class agrees": round(float((logits(ours).argmax(1) == logits(theirs).argmax(1)).mean()), 3),
                     "top noun agrees": round(float((top_noun(ours) == top_noun(theirs)).mean()), 3),
                     "mean top-1 prob, shipped features": round(float(top_prob(ours)), 3),
                     "mean top-1 prob, pretrained net": round(float(top_prob(theirs)), 3)})
        if refs is not None:
            rows[-1]["top noun named, shipped features"] = named_rate(top_noun(ours), tagger, refs)
            rows[-1]["top noun named, pretrained net"] = named_rate(top_noun(theirs), tagger, refs)
        print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
