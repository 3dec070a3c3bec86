"""`captioner finetune`'s new-domain gain by k-fold cross-validation: every photo is validated once.

    python scripts/finetune_cv.py --out runs/cv                      # the defaults, 5 folds of COCO-MINI
    python scripts/finetune_cv.py --out runs/cv_lr1e-4 --set lr=1e-4  # any finetune.Settings field

One `finetune` run's validation part is a fifth of the photos: on COCO-MINI 16, where one photo moves
CIDEr-D by several points and neighbouring points of the WiSE-FT line differ by 5 or more. Here the
photos are split into k folds by the same name hash as `finetune.split_by_image` (fold 0 is the part
the command itself validates on), each fold is fine-tuned on the others (`finetune.finetune`, with
--forget-budget inf so that it decodes the starting model's dev once), and every point of the line
captions its own fold's photos. Pooled, each point is scored on all the photos at once (CIDEr-D with
the idf of all their references, as `captioner evaluate` scores a data set): the starting model's row
is then the same number as on the whole data set. The old side (the starting model's dev, Flickr8k
dev for the shipped model) is scored per point on fold 0's model; one fold's forgetting stands for all.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import yaml

from captioner import checkpoint
from captioner.config import Config
from captioner.data import load_split
from captioner.evaluate import decode_features
from captioner.features import open_features
from captioner.finetune import Settings, _base_dev, finetune, load_captions, usable, write_jsonl
from captioner.inference import Captioner
from captioner.interpolation import ALPHAS, interpolate
from captioner.metrics import CiderD, bleu
from captioner.vocab import tokenize

COCO_MINI = "../shared/data/coco_mini_train"


def folds(examples, k: int) -> list[list[int]]:
    """k parts of the examples by the hash order finetune.split_by_image uses: part 0 is its validation part."""
    rank = sorted(range(len(examples)), key=lambda i: hashlib.sha1(str(examples[i].image_id).encode()).hexdigest())
    n_val = max(1, round(len(examples) / k))
    return [rank[f * n_val:(f + 1) * n_val] if f < k - 1 else rank[f * n_val:] for f in range(k)]


def pooled(captions: list[str], refs: list[list[str]]) -> dict[str, float]:
    cider = CiderD([[tokenize(r) for r in rs] for rs in refs])
    return {"bleu4": bleu(captions, refs)["bleu4"],
            "cider": 100 * float(np.mean([cider.score(tokenize(c), i) for i, c in enumerate(captions)]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=f"{COCO_MINI}/captions_train2017.json")
    p.add_argument("--images", default=f"{COCO_MINI}/train2017")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[], help="finetune.Settings fields, e.g. lr=1e-4 epochs=8")
    p.add_argument("--decode", nargs="*", default=[], help="decoding options, e.g. guide=off")
    p.add_argument("--old-alphas", type=float, nargs="*", default=[0.2, 0.4, 0.6, 0.8, 1.0],
                   help="points scored on the starting model's dev (fold 0's model)")
    args = p.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    settings = Settings(**{**overrides, "forget_budget": math.inf})
    decode = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.decode)}
    _, examples = load_captions(args.data, "auto", args.images)
    examples = usable(examples, {})
    alphas = (0.0, *ALPHAS)
    captions = {a: [None] * len(examples) for a in alphas}
    old = {}
    for f, part in enumerate(folds(examples, args.folds)):
        run = args.out / f"fold{f}"
        inside = set(part)
        run.mkdir(parents=True, exist_ok=True)
        write_jsonl([ex for i, ex in enumerate(examples) if i not in inside], args.images, run / "train_part.jsonl")
        write_jsonl([examples[i] for i in part], args.images, run / "val_part.jsonl")
        if not (run / "model" / "report.json").exists():
            finetune(run / "train_part.jsonl", run / "model", fmt="jsonl", images=args.images,
                     val=run / "val_part.jsonl", settings=settings)
        start, tuned = checkpoint.load(run / "model" / "start.pt"), checkpoint.load(run / "model" / "finetuned.pt")
        n_old = len(start["vocab"]["itos"]) - len(json.loads((run / "model" / "report.json").read_text())["new_words"])
        cap = Captioner.from_payload(tuned, device=settings.device)
        cfg = Config.from_dict(tuned["config"])
        val_ex = load_split(cfg.data, "val")
        val_feats = open_features(cfg.data.feature_cache, "val", val_ex, cap.encoder)
        base_cfg = Config.from_dict(start["config"])
        old_data = _base_dev(base_cfg, Captioner.from_payload(start, device=settings.device)) if f == 0 else None
        for a in alphas:
            cap.decoder.load_state_dict(interpolate(start["decoder"], tuned["decoder"], a, n_old))
            for i, c in zip(part, decode_features(cap, val_feats, options=cap.options(**decode))):
                captions[a][i] = c
            if f == 0 and (a == 0.0 or a in args.old_alphas) and not isinstance(old_data, str):
                hyps = decode_features(cap, old_data[0], options=cap.options(**decode))
                old[a] = pooled(hyps, [ex.captions for ex in old_data[1]])
        print(f"fold {f}: {len(part)} photos validated", flush=True)
    refs = [ex.captions for ex in examples]
    rows = {a: pooled(captions[a], refs) for a in alphas}
    print(f"\n{len(examples)} photos, {args.folds} folds, settings {overrides or 'defaults'}, "
          f"decoding {decode or 'as the model says'}")
    print("| alpha | new: CIDEr-D | new: BLEU-4 | old: BLEU-4 | old: CIDEr-D |\n|---|---|---|---|---|")
    for a in alphas:
        o = old.get(a)
        olds = f"{o['bleu4']:.2f} | {o['cider']:.2f}" if o else "- | -"
        print(f"| {a:.1f} | {rows[a]['cider']:.2f} | {rows[a]['bleu4']:.2f} | {olds} |")
    name = "_".join(["cv", *args.decode]) + ".json"
    (args.out / name).write_text(json.dumps({"settings": overrides, "decode": decode, "new": rows, "old": old,
                                             "captions": captions}, indent=1) + "\n")


if __name__ == "__main__":
    main()
