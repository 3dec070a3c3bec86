"""Leave-a-concept-out on Flickr8k: can fine-tuning teach a model a concept it never saw?

    # 1. the data: Flickr8k train without the photos whose captions mention the concept, its
    #    features cut from the full cache (no re-extraction), <= 100 concept photos to fine-tune on
    python scripts/leave_concept_out.py prepare --out runs/concept
    # 2. a base model that never saw the concept
    captioner train --config runs/concept/base.yaml
    # 3. fine-tune it on the concept photos
    captioner finetune --data runs/concept/concept_train.jsonl --images ../shared/data/flickr8k/Flicker8k_Dataset \
        --checkpoint runs/concept/base/best.pt --out runs/concept/finetuned
    # 4. dev photos of the concept vs the rest of dev, before and after
    python scripts/leave_concept_out.py report --out runs/concept runs/concept/base/best.pt \
        runs/concept/finetuned/best.pt

The cached features must exist: captioner extract-features --config configs/flickr8k_lite0.yaml.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from captioner import Captioner
from captioner.config import load_config
from captioner.data import load_flickr8k, load_split
from captioner.encoders import build_encoder
from captioner.evaluate import decode_features
from captioner.features import open_features
from captioner.finetune import scores, write_jsonl
from captioner.vocab import tokenize

BICYCLE = "bike bikes bicycle bicycles biker bikers bicyclist bicyclists cyclist cyclists bmx"


def mentions(captions: list[str], words: set[str]) -> bool:
    return any(words & set(tokenize(c)) for c in captions)


def prepare(args) -> None:
    words, out, base = set(args.words.split()), Path(args.out), load_config(args.base_config)
    images = Path(base.data.root) / "Flicker8k_Dataset"
    cache = out / "features"
    cache.mkdir(parents=True, exist_ok=True)
    concept_train = []
    encoder = build_encoder(base.model.encoder, base.model.pretrained, regions=base.model.attention)
    for split in (base.data.train_split, base.data.dev_split):
        exs = load_flickr8k(base.data.root, split)
        feats = open_features(base.data.feature_cache, split, exs, encoder)
        keep = [i for i, ex in enumerate(exs) if split != base.data.train_split or not mentions(ex.captions, words)]
        if split == base.data.train_split:
            concept_train = [ex for ex in exs if mentions(ex.captions, words)][:args.photos]
        write_jsonl([exs[i] for i in keep], images, out / f"{split}.jsonl")
        np.save(cache / f"{split}.npy", np.asarray(feats[keep]))
        # The ids as the JSONL reads them (paths relative to the image folder): Flickr8k's file names.
        meta = json.loads((Path(base.data.feature_cache) / f"{split}.json").read_text())
        meta.update(ids=[exs[i].image_id for i in keep], done=len(keep))
        (cache / f"{split}.json").write_text(json.dumps(meta))
        print(f"{split}: {len(keep)} of {len(exs)} photos kept")
    write_jsonl(concept_train, images, out / "concept_train.jsonl")
    cfg = base.to_dict()
    cfg["data"].update(format="jsonl", root=str(out / "train.jsonl"), images=str(images),
                       dev_annotations=str(out / "dev.jsonl"), feature_cache=str(cache))
    cfg["train"]["out_dir"] = str(out / "base")
    (out / "base.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (out / "words.txt").write_text(args.words + "\n")
    print(f"{len(concept_train)} concept photos to fine-tune on; base config: {out / 'base.yaml'}")


def report(args) -> None:
    out = Path(args.out)
    words = set((out / "words.txt").read_text().split())
    cfg = load_config(out / "base.yaml")
    dev = load_split(cfg.data, cfg.data.dev_split)
    encoder = build_encoder(cfg.model.encoder, cfg.model.pretrained, regions=cfg.model.attention)
    feats = np.asarray(open_features(cfg.data.feature_cache, cfg.data.dev_split, dev, encoder))
    concept = [i for i, ex in enumerate(dev) if mentions(ex.captions, words)]
    rest = [i for i in range(len(dev)) if i not in set(concept)]
    rows = {}
    for path in args.checkpoints:
        cap = Captioner.load(path, device="cpu")
        row = {}
        # hit rate: the share of captions naming the concept (on the rest of dev: false positives)
        for name, idx in (("concept", concept), ("rest", rest)):
            row[name] = scores(cap, feats[idx], [dev[i] for i in idx])
            row[name]["hit_rate"] = 100 * float(np.mean([bool(words & set(tokenize(h)))
                                                         for h in decode_features(cap, feats[idx])]))
        rows[path] = row
        print(f"{path}: concept dev ({len(concept)} photos) hit rate {row['concept']['hit_rate']:.1f}%, "
              f"BLEU-4 {row['concept']['bleu4']:.2f}; rest of dev ({len(rest)}) BLEU-4 {row['rest']['bleu4']:.2f}, "
              f"names the concept in {row['rest']['hit_rate']:.1f}%")
    (out / "report.json").write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("prepare")
    s.add_argument("--out", default="runs/concept")
    s.add_argument("--words", default=BICYCLE, help="the concept: photos whose captions use any of these words")
    s.add_argument("--photos", type=int, default=100, help="concept photos to fine-tune on")
    s.add_argument("--base-config", default="configs/flickr8k_lite0.yaml")
    s.set_defaults(func=prepare)
    s = sub.add_parser("report")
    s.add_argument("--out", default="runs/concept")
    s.add_argument("checkpoints", nargs="+")
    s.set_defaults(func=report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
