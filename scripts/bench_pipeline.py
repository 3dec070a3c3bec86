"""Benchmark folder captioning against the encoder alone, and single-image latency.

  pipeline_efficiency = caption-dir images/s / encoder-forward images/s
      caption-dir: `folder.caption_dir` end to end (listing, decode workers, encoder,
      beam search, fsync'd output); encoder: `Captioner.encode` over the same photos
      already preprocessed, same batch size. Both run in every repeat, side by side;
      the figure is the median of the per-repeat ratios. Goal >= 0.85.
  latency_p50_ms / latency_p95_ms: `Captioner.caption(path, beam_size=3)`, one photo
      at a time (open, preprocess, encode, beam search). Goal p50 <= 150 ms on CPU.

    python scripts/bench_pipeline.py [--checkpoint C] [--images 256] [--repeats 3] [--json]

scripts/benchmark.py runs it as a child process (`--json`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from captioner.folder import caption_dir
from captioner.inference import DEFAULT_CHECKPOINT, Captioner

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k" / "Flicker8k_Dataset"


def photos(n: int, folder: Path = PHOTOS) -> list[Path]:
    found = sorted(folder.glob("*.jpg"))[:n]
    if len(found) < n:
        raise FileNotFoundError(f"need {n} photos in {folder}, found {len(found)}")
    return found


def _encoder_seconds(cap: Captioner, pixels: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        cap.encode(pixels[i:i + batch_size])
    return time.perf_counter() - start


def _caption_dir_seconds(cap: Captioner, folder: Path, batch_size: int, workers: int, beam_size: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = caption_dir(cap, folder, Path(tmp) / "out.jsonl", batch_size=batch_size, workers=workers,
                              progress=False, beam_size=beam_size)
        seconds = time.perf_counter() - start
    if summary.errors or summary.captioned != summary.total:
        raise RuntimeError(f"caption-dir did not caption every photo: {summary}")
    return seconds


def run(checkpoint: str | Path | None = None, n_images: int = 256, batch_size: int = 32, workers: int = 2,
        repeats: int = 3, latency_images: int = 50, beam_size: int = 3, device: str = "cpu") -> dict:
    """Measure on the first n_images Flickr8k photos; returns the figures as a dict."""
    cap = Captioner.load(checkpoint, device=device)
    files = photos(max(n_images, latency_images))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for f in files[:n_images]:  # links, not copies: caption-dir reads the real photos
            (folder / f.name).symlink_to(f)
        pixels = torch.stack([cap.preprocess(f) for f in files[:n_images]])
        cap.caption(files[0], beam_size=beam_size)  # warm-up: first calls allocate and pick kernels
        enc, pipe = [], []
        for _ in range(repeats):
            enc.append(n_images / _encoder_seconds(cap, pixels, batch_size))
            pipe.append(n_images / _caption_dir_seconds(cap, folder, batch_size, workers, beam_size))
    latencies = []
    for f in files[:latency_images]:
        start = time.perf_counter()
        cap.caption(f, beam_size=beam_size)
        latencies.append((time.perf_counter() - start) * 1000)
    return {
        "pipeline_efficiency": round(statistics.median(p / e for p, e in zip(pipe, enc)), 3),
        "caption_dir_images_per_s": round(statistics.median(pipe), 1),
        "encoder_images_per_s": round(statistics.median(enc), 1),
        "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "latency_p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "n_images": n_images, "batch_size": batch_size, "workers": workers, "repeats": repeats,
        "latency_images": latency_images, "beam_size": beam_size, "device": str(cap.device),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", "-c", default=None, help="default: the shipped model")
    p.add_argument("--images", type=int, default=256, help="photos for the throughput runs (>= 200)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latency-images", type=int, default=50)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args(argv)
    if args.checkpoint is None and not DEFAULT_CHECKPOINT.is_file():
        print(f"The default model is not installed ({DEFAULT_CHECKPOINT}); pass --checkpoint "
              "(e.g. runs/flickr8k_lite0/best.pt).", file=sys.stderr)
        return 2
    try:
        r = run(args.checkpoint, args.images, args.batch_size, args.workers, args.repeats, args.latency_images,
                args.beam, args.device)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r))
    else:
        width = max(map(len, r))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
