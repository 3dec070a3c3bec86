"""Guidance sweep on the development photos: COCO mini (80 out-of-domain photos) and Flickr8k dev.

    python scripts/tune_guidance.py --grid guide_threshold=0.1,0.2,0.3 guide_max=1,2,3
    python scripts/tune_guidance.py --checkpoint A.pt B.pt --grid beam_size=3     # one setting, two models

Each data set's photos are encoded once (the first checkpoint's encoder; every checkpoint given
must share it) and cached in --cache; every setting then only decodes. A setting is a combination
of the --grid values, any `DecodeConfig` fields, applied over the model's own defaults (the first
row, "defaults", is those alone). Per row: COCO mini CIDEr-D, BLEU-4 and object-mention F1, the
novel nouns' mentions (the mapping's nouns Flickr8k's captions never use), Flickr8k dev BLEU-4,
CIDEr-D and F1. CIDEr-D is pycocoevalcap's formula on the package's tokens (`metrics.CiderD`, idf
from the scored references), so it needs no Java; `captioner evaluate` gives coco-caption's on
PTB tokens, a little different. Development photos only: no test split is read.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from make_imagenet_nouns import NOVEL
from torch.utils.data import DataLoader

from captioner import Captioner, metrics
from captioner.data import ImageFiles
from captioner.encoder_engine import weights_checksum
from captioner.evaluate import decode_features, load_examples
from captioner.vocab import tokenize

DATASETS = {
    "coco": ("../shared/data/coco_mini_train/captions_train2017.json", None,
             "../shared/data/coco_mini_train/train2017"),
    "flickr8k_dev": ("../shared/data/flickr8k", "dev", None),
}


def features(cap: Captioner, name: str, cache: Path) -> tuple[torch.Tensor, list[list[str]]]:
    """(features, references) of one data set, encoded once per encoder and kept in `cache`."""
    data, split, images = DATASETS[name]
    _, examples = load_examples(data, split, images)
    examples = [ex for ex in examples if ex.captions and ex.path.is_file()]
    path = cache / f"{name}-{weights_checksum(cap.encoder)[:16]}.pt"
    if path.is_file():
        feats = torch.load(path, weights_only=True)
    else:
        loader = DataLoader(ImageFiles([ex.path for ex in examples], cap.preprocess), batch_size=32, num_workers=1)
        feats = torch.cat([cap.encode(pixels) for pixels in loader])
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(feats, path)
    return feats, [ex.captions for ex in examples]


def score(hyps: list[str], refs: list[list[str]], novel: dict[str, set[str]]) -> dict[str, float]:
    cider = metrics.CiderD([[tokenize(r) for r in rs] for rs in refs])
    counts = metrics.mention_counts(hyps, refs, metrics.object_nouns())
    novel_hits = sum(c["hit"] for n, c in counts.items() if n in novel)
    novel_named = sum(c["predicted"] for n, c in counts.items() if n in novel)
    return {"bleu4": metrics.bleu(hyps, refs)["bleu4"],
            "cider": 100 * float(np.mean([cider.score(tokenize(h), i) for i, h in enumerate(hyps)])),
            **metrics.object_mentions(hyps, refs), "novel_hits": novel_hits, "novel_named": novel_named,
            "novel_gold": sum(c["gold"] for n, c in counts.items() if n in novel)}


def settings(grid: list[str]) -> list[dict]:
    """`name=v1,v2` items -> every combination as {name: value} (values read as YAML scalars)."""
    axes = []
    for item in grid:
        name, _, values = item.partition("=")
        axes.append([(name, yaml.safe_load(v)) for v in values.split(",")])
    return [{}, *(dict(c) for c in itertools.product(*axes))] if axes else [{}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", default=[None], help="default: the shipped model")
    p.add_argument("--grid", nargs="*", default=[], help="DecodeConfig fields, e.g. guide_threshold=0.1,0.2")
    p.add_argument("--cache", type=Path, default=Path("/tmp/captioner_tune_guidance"))
    p.add_argument("--json", help="also append one JSON object per row to this file")
    args = p.parse_args()
    novel = {n: w for n, w in metrics.object_nouns().items() if n in NOVEL}
    print("| checkpoint | setting | COCO CIDEr | COCO BLEU-4 | COCO F1 | COCO novel named (right) / in refs | "
          "Flickr8k dev BLEU-4 | Flickr8k dev CIDEr | Flickr8k dev F1 |\n|---|---|---|---|---|---|---|---|---|")
    for path in args.checkpoint:
        cap = Captioner.load(path, device="cpu")
        data = {name: features(cap, name, args.cache) for name in DATASETS}
        for setting in settings(args.grid):
            options = cap.options(**setting)
            r = {name: score(decode_features(cap, feats, options=options), refs, novel)
                 for name, (feats, refs) in data.items()}
            c, f = r["coco"], r["flickr8k_dev"]
            name = " ".join(f"{k}={v}" for k, v in setting.items()) or "defaults"
            print(f"| {path or 'shipped'} | {name} | {c['cider']:.2f} | {c['bleu4']:.2f} | {c['mention_f1']:.2f} | "
                  f"{c['novel_named']} ({c['novel_hits']}) / {c['novel_gold']} | {f['bleu4']:.2f} | {f['cider']:.2f} | "
                  f"{f['mention_f1']:.2f} |", flush=True)
            if args.json:
                with open(args.json, "a") as out:
                    out.write(json.dumps({"checkpoint": path, "setting": setting, **r}) + "\n")


if __name__ == "__main__":
    main()
