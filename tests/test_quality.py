"""The shipped model on real photos: a regression guard on Flickr8k dev (tune-split) BLEU.

The reference figure was measured on the committed model with
    python -m pytest tests/test_quality.py -s      (prints the BLEU it measures)
and the same 500 images are scored end to end: JPEG -> encoder -> beam search -> BLEU.
"""
from __future__ import annotations

import os

from conftest import FLICKR8K, requires_flickr8k

from captioner.evaluate import evaluate
from captioner.inference import DEFAULT_CHECKPOINT

N_IMAGES = 500
# Measured on the committed model at its defaults (beam 3, Wu alpha 1.0, guided by its tags).
MEASURED_BLEU4 = 21.38
MARGIN = 1.0
MEASURED_DISTINCT_PCT = 84.4  # % distinct captions on the same images: self-critical collapse shows here first
DISTINCT_MARGIN = 5.0


@requires_flickr8k()
def test_shipped_model_keeps_its_dev_bleu(tmp_path):
    assert DEFAULT_CHECKPOINT.is_file(), "the default model must ship inside the package"
    subset = tmp_path / "flickr8k_dev_subset"
    subset.mkdir()
    names = (FLICKR8K / "Flickr_8k.devImages.txt").read_text().split()[:N_IMAGES]
    (subset / "Flickr_8k.devImages.txt").write_text("\n".join(names) + "\n")
    os.symlink(FLICKR8K / "Flickr8k.token.txt", subset / "Flickr8k.token.txt")
    os.symlink(FLICKR8K / "Flicker8k_Dataset", subset / "Flicker8k_Dataset")
    report = evaluate(subset, "dev", coco=False, progress=False, device="cpu")
    print(f"\nshipped model, first {N_IMAGES} dev images: " +
          ", ".join(f"BLEU-{n} {report[f'bleu{n}']:.2f}" for n in range(1, 5)) +
          f"; {report['distinct_pct']:.1f}% distinct captions, {report['vocab_used']} words used")
    assert report["n_images"] == N_IMAGES and report["empty_hypotheses"] == 0
    assert report["bleu4"] >= MEASURED_BLEU4 - MARGIN
    assert report["distinct_pct"] >= MEASURED_DISTINCT_PCT - DISTINCT_MARGIN
