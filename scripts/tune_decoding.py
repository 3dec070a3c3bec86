"""Decoding sweep on dev, and the quality / diversity trade-off across checkpoints.

    python scripts/tune_decoding.py runs/flickr8k_lite0/best.pt --beams 3 5 8 --penalties none wu --alphas 0.7 1.0
    python scripts/tune_decoding.py A.pt B.pt C.pt --beams 3 8 --penalties wu --alphas 1.0 --json sweep.jsonl

Each checkpoint's own encoder (fine-tuned or not) encodes the dev photos once; every decoding
setting then decodes those features. One markdown row per (checkpoint, setting): corpus BLEU-4
(the package's), coco-caption's CIDEr and METEOR (when Java is found), and the diversity measures
of `captioner evaluate`: words used, % distinct captions, % verbatim training captions, mean
length. Dev only: the test split stays untouched.
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.utils.data import DataLoader

from captioner import Captioner, metrics
from captioner.data import ImageFiles, load_split
from captioner.evaluate import decode_features


def dev_features(cap: Captioner, examples) -> torch.Tensor:
    images = DataLoader(ImageFiles([ex.path for ex in examples], cap.preprocess), batch_size=64, num_workers=2)
    return torch.cat([cap.encode(pixels) for pixels in images])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--beams", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--penalties", nargs="+", default=["none", "avg", "wu"])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.7], help="exponents for the wu penalty")
    p.add_argument("--json", help="also append one JSON object per row to this file")
    args = p.parse_args()
    coco = metrics.java_available()
    print("| checkpoint | beam | length penalty | BLEU-4 | CIDEr | METEOR | words used | % distinct | "
          "% verbatim train | mean length |\n|---|---|---|---|---|---|---|---|---|---|")
    for path in args.checkpoints:
        cap = Captioner.load(path, device="cpu")
        data = cap.config.data
        examples = load_split(data, data.dev_split)
        references = [ex.captions for ex in examples]
        train_captions = [c for ex in load_split(data, data.train_split) for c in ex.captions]
        feats = dev_features(cap, examples)
        for beam in args.beams:
            for pen in args.penalties:
                for alpha in args.alphas if pen == "wu" else [cap.config.decode.alpha]:
                    hyps = decode_features(cap, feats, options=cap.options(beam_size=beam, length_penalty=pen,
                                                                           alpha=alpha))
                    row = {"checkpoint": path, "beam": beam, "penalty": pen, "alpha": alpha,
                           **metrics.bleu(hyps, references), **metrics.diversity(hyps, train_captions)}
                    if coco:
                        row |= metrics.coco_caption(hyps, references)
                    name = f"wu α={alpha}" if pen == "wu" else pen
                    print(f"| {path} | {beam} | {name} | {row['bleu4']:.2f} | {row.get('cider', float('nan')):.2f} | "
                          f"{row.get('meteor', float('nan')):.2f} | {row['vocab_used']} | {row['distinct_pct']:.1f} | "
                          f"{row['verbatim_train_pct']:.1f} | {row['mean_length']:.1f} |", flush=True)
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
