"""`captioner finetune`'s new-domain gain by k-fold cross-validation: every photo is validated once.

    python scripts/finetune_cv.py --out runs/cv                      # the defaults, 5 folds of COCO-MINI
    python scripts/finetune_cv.py --out runs/cv --decode guide=off   # the same models, decoded unguided
    python scripts/finetune_cv.py --out runs/cv_lr1e-4 --set lr=1e-4  # any finetune.Settings field

One `finetune` run's validation part is a fifth of the photos: on COCO-MINI 16, where one photo moves
CIDEr-D by several points and neighbouring points of the WiSE-FT line differ by 5 or more. Here the
photos are split into k folds by the name hash of `finetune.split_by_image` (with 5 folds fold 0 is the
part the command itself validates on), each fold is fine-tuned on the others (`finetune.finetune`), and
the starting model and every point of each fold's line caption that fold's photos. Pooled, each row is
scored on all the photos at once (CIDEr-D with the idf of all their references, as `captioner evaluate`
scores a data set; the starting model's row is its score on the whole data set), with the standard
error of its CIDEr-D change from the starting model, paired by photo. The old side (the starting
model's dev, Flickr8k dev for the shipped model) is scored on fold 0's line; one fold stands for all.
Fold models are kept in OUT and reused by a later run with the same settings (--decode may differ).
"""
from __future__ import annotations

import argparse
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
from captioner.finetune import (
    Settings,
    ciders,
    finetune,
    hash_order,
    load_captions,
    paired_error,
    score_captions,
    usable,
    write_jsonl,
)
from captioner.inference import DEFAULT_CHECKPOINT, Captioner
from captioner.interpolation import ALPHAS, interpolate

COCO_MINI = "../shared/data/coco_mini_train"
START = "start"  # the starting model's row


def folds(examples, k: int) -> list[list[int]]:
    """k parts of the examples in `hash_order`; part 0 is the round(n / k) first, as split_by_image takes."""
    n = len(examples)
    if not 2 <= k <= n:
        raise ValueError(f"--folds must be between 2 and the {n} usable photos, got {k}")
    rank = hash_order(examples)
    first = round(n / k)
    return [rank[:first], *(p.tolist() for p in np.array_split(rank[first:], k - 1))]


def fold_models(examples, part: list[int], run: Path, images: str, settings: Settings) -> Path:
    """Fine-tunes on the examples outside `part`, validating on `part`; returns the finetune output folder
    (reused when it was made with the same settings)."""
    model, wanted = run / "model", {k: str(v) for k, v in vars(settings).items()}
    if (model / "report.json").exists():
        made = json.loads((run / "settings.json").read_text())
        if made != wanted:
            raise ValueError(f"{model} was fine-tuned with other settings ({made}); choose another --out")
        return model
    run.mkdir(parents=True, exist_ok=True)
    inside = set(part)
    write_jsonl([ex for i, ex in enumerate(examples) if i not in inside], images, run / "train_part.jsonl")
    write_jsonl([examples[i] for i in part], images, run / "val_part.jsonl")
    (run / "settings.json").write_text(json.dumps(wanted))
    finetune(run / "train_part.jsonl", model, fmt="jsonl", images=images, val=run / "val_part.jsonl",
             settings=settings)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=f"{COCO_MINI}/captions_train2017.json")
    p.add_argument("--images", default=f"{COCO_MINI}/train2017")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[], help="finetune.Settings fields, e.g. lr=1e-4 epochs=8")
    p.add_argument("--decode", nargs="*", default=[], help="decoding options, e.g. guide=off beam_size=5")
    p.add_argument("--old-alphas", type=float, nargs="*", default=[0.2, 0.4, 0.6, 0.8, 1.0],
                   help="points scored on the starting model's dev (fold 0's model)")
    args = p.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    # The old side is scored here, once per point: inf spares finetune the choice's own dev decodes.
    settings = Settings(**{**overrides, "forget_budget": math.inf})
    decode = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.decode)}
    _, examples = load_captions(args.data, "auto", args.images)
    examples = usable(examples, {})
    rows = (START, *ALPHAS)
    captions = {r: [None] * len(examples) for r in rows}
    old = {}
    start = checkpoint.load(settings.start or DEFAULT_CHECKPOINT)  # the same for every fold
    n_old, before = len(start["vocab"]["itos"]), Captioner.from_payload(start, device="cpu")
    for f, part in enumerate(folds(examples, args.folds)):
        model = fold_models(examples, part, args.out / f"fold{f}", args.images, settings)
        tuned = checkpoint.load(model / "finetuned.pt")
        cap = Captioner.from_payload(tuned, device="cpu")
        cfg = Config.from_dict(tuned["config"])
        val_ex = load_split(cfg.data, "val")
        val_feats = open_features(cfg.data.feature_cache, "val", val_ex, cap.encoder)
        grown = checkpoint.load(model / "start.pt")  # the starting model with the fold's new words
        base = Config.from_dict(grown["config"]).data  # the starting model's data, its dev features cached there
        dev = load_split(base, base.dev_split) if f == 0 else None
        dev_feats = open_features(base.feature_cache, base.dev_split, dev, cap.encoder) if dev else None
        for r in rows:
            if r == START:
                model_r = before
            else:
                cap.decoder.load_state_dict(interpolate(grown["decoder"], tuned["decoder"], r, n_old))
                model_r = cap
            options = model_r.options(**decode)
            for i, c in zip(part, decode_features(model_r, val_feats, options=options), strict=True):
                captions[r][i] = c
            if dev and (r == START or r in args.old_alphas):
                old[r] = score_captions(decode_features(model_r, dev_feats, options=options),
                                        [ex.captions for ex in dev])
        print(f"fold {f}: {len(part)} photos validated", flush=True)
    refs = [ex.captions for ex in examples]
    new = {r: score_captions(captions[r], refs) for r in rows}
    per_photo = {r: ciders(captions[r], refs) for r in rows}
    print(f"\n{len(examples)} photos, {args.folds} folds, settings {overrides or 'defaults'}, "
          f"decoding {args.decode or 'as the model says'}")
    print("| model | CIDEr-D | change ± standard error | BLEU-4 | old: BLEU-4 | old: CIDEr-D |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        o = old.get(r)
        olds = f"{o['bleu4']:.2f} | {o['cider']:.2f}" if o else "- | -"
        change = "" if r == START else (f"{new[r]['cider'] - new[START]['cider']:+.2f} ± "
                                        f"{paired_error(per_photo[r], per_photo[START]):.2f}")
        name = "starting model" if r == START else f"alpha {r:.1f}"
        print(f"| {name} | {new[r]['cider']:.2f} | {change} | {new[r]['bleu4']:.2f} | {olds} |")
    name = "_".join(["cv", *args.decode]) + ".json"
    (args.out / name).write_text(json.dumps({"settings": overrides, "decode": args.decode, "new": new, "old": old,
                                             "captions": captions}, indent=1) + "\n")


if __name__ == "__main__":
    main()
