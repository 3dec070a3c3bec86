#!/usr/bin/env python
"""Score a split: the same as `captioner evaluate ...` (see `captioner evaluate --help`).

    python scripts/evaluate_bleu.py --data ../shared/data/flickr8k --split dev --checkpoint runs/flickr8k_lite0/best.pt
"""
import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
