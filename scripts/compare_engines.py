"""Do the encoder engines caption alike? Captions of the first N Flickr8k dev photos with the default
engine (onnxruntime on a CPU) and with --engine torch, at the model's own decode settings.

    python scripts/compare_engines.py [--images 200] [--checkpoint C]

Prints how many captions are identical, the largest feature difference, and the photos that differ
(a near-tie in beam search may flip).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from captioner.inference import Captioner

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--checkpoint", "-c", default=None, help="default: the shipped model")
    p.add_argument("--data", default=str(DEV), help="Flickr8k folder")
    args = p.parse_args(argv)
    data = Path(args.data)
    names = (data / "Flickr_8k.devImages.txt").read_text().split()[:args.images]
    photos = [data / "Flicker8k_Dataset" / n for n in names]
    caps = {e: Captioner.load(args.checkpoint, device="cpu", engine=e) for e in ("auto", "torch")}
    pixels = torch.stack([caps["auto"].preprocess(f) for f in photos])
    feats = {e: torch.cat([c.encode(pixels[i:i + 32]) for i in range(0, len(pixels), 32)]) for e, c in caps.items()}
    out = {e: [c.format(h)[0] for h in c.decode(feats[e])] for e, c in caps.items()}
    same = [a["caption"] == b["caption"] for a, b in zip(out["auto"], out["torch"])]
    score_gap = max((abs(a["score"] - b["score"]) for a, b, s in zip(out["auto"], out["torch"], same) if s), default=0)
    print(f"{sum(same)} of {len(same)} captions identical ({100 * sum(same) / len(same):.1f}%); "
          f"largest feature difference {(feats['auto'] - feats['torch']).abs().max().item():.2e}; "
          f"largest score difference among identical captions {score_gap:.2e}")
    for name, a, b, s in zip(names, out["auto"], out["torch"], same):
        if not s:
            print(f"  {name}: {a['caption']!r} ({a['score']}) vs torch {b['caption']!r} ({b['score']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
