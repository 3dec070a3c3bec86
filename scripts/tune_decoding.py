"""Sweep decoding settings of a trained checkpoint on the dev split's cached features.

    python scripts/tune_decoding.py runs/flickr8k_lite0/best.pt --beams 1 3 5 --penalties none avg wu

Prints corpus BLEU-1..4 and mean caption length per setting (dev only: the test split stays untouched).
"""
from __future__ import annotations

import argparse
import json
import sys


from captioner import Captioner
from captioner.data import load_split
from captioner.features import open_features
from captioner.evaluate import evaluate_bleu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--beams", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--penalties", nargs="+", default=["none", "avg", "wu"])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.7], help="exponents for the wu penalty")
    args = p.parse_args()
    cap = Captioner.load(args.checkpoint, device="cpu")
    cfg = cap.config
    examples = load_split(cfg.data, cfg.data.dev_split)
    feats = open_features(cfg.data.feature_cache, cfg.data.dev_split, examples, cap.encoder)
    print("| beam | length penalty | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 |\n|---|---|---|---|---|---|")
    for beam in args.beams:
        for pen in args.penalties:
            for alpha in args.alphas if pen == "wu" else [cfg.decode.alpha]:
                cfg.decode.beam_size, cfg.decode.length_penalty, cfg.decode.alpha = beam, pen, alpha
                s = evaluate_bleu(cap, feats, examples)
                name = f"wu α={alpha}" if pen == "wu" else pen
                print(f"| {beam} | {name} | {s['bleu1']:.1f} | {s['bleu2']:.1f} | {s['bleu3']:.1f} | {s['bleu4']:.2f} |",
                      flush=True)
                print(json.dumps({"beam": beam, "penalty": pen, "alpha": alpha, **s}), file=sys.stderr)


if __name__ == "__main__":
    main()
