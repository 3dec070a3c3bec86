"""The inference paths with the default encoder engine (onnxruntime on a CPU) against --engine torch.

Both engines run in this one process on the same photos, their repeats interleaved so
background load hits both alike; each figure is a median over repeats after a warm-up.

  caption_dir_speedup   `caption-dir` images/s (folder.caption_dir end to end: listing, decode
                        workers, encoder, beam search, fsync'd output), default engine ÷ torch. Goal >= 3x.
  extract_speedup       `extract-features` images/s (features.extract into a fresh cache), the same
                        ratio. Goal >= 4x.
  latency_p50_ms/_p95   `Captioner.caption(path)`, one photo at a time (open, preprocess, encode,
                        search), the model's own decode settings, default engine. Information.
  latency_p50_ms_runtime  the same with what the CLI, demo and service caption with on a CPU
                        (bundles.load: the bundle in the torch-free runtime). Goal p50 <= 15 ms.
  guide_caption_dir_ratio  caption-dir images/s with the model's guided search ÷ with --guide off,
                        default engine. Goal >= 0.8.
  guide_latency_ratio   single-image latency p50, guided ÷ --guide off. Goal <= 1.3.
  pipeline_efficiency_runtime  caption-dir images/s ÷ the best its stages allow, 1 / (load + encoder +
                        search seconds per photo), each stage timed alone on the same photos, in
                        the same repeat, with what the command line runs on a CPU (the runtime;
                        search: tags, beam search and formatting, `describe`). Goal >= 0.85.
  pipeline_efficiency   the same with the torch Captioner (default engine). Information.

As the command line does, numpy's OpenBLAS runs on one thread (captioner.cli.main says why).

    python scripts/bench_pipeline.py [--checkpoint C] [--images 200] [--repeats 5] [--json]

scripts/benchmark.py runs it as a child process (`--json`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # extract-features' progress bar would time the terminal too
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads, as captioner.cli.main sets it

import numpy as np  # noqa: E402
import torch  # noqa: E402

from captioner import bundles  # noqa: E402
from captioner.data import Example  # noqa: E402
from captioner.encoder_engine import resolve_engine  # noqa: E402
from captioner.features import extract  # noqa: E402
from captioner.folder import caption_dir  # noqa: E402
from captioner.inference import DEFAULT_CHECKPOINT, Captioner  # noqa: E402
from captioner.runtime import Runtime  # noqa: E402

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k" / "Flicker8k_Dataset"
ENGINES = ("auto", "torch")


def photos(n: int, folder: Path = PHOTOS) -> list[Path]:
    found = sorted(folder.glob("*.jpg"))[:n]
    if len(found) < n:
        raise FileNotFoundError(f"need {n} photos in {folder}, found {len(found)}")
    return found


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _caption_dir(cap: Captioner | Runtime, folder: Path, batch_size: int, workers: int, tmp: Path, **options) -> float:
    out = tmp / f"out_{time.perf_counter_ns()}.jsonl"
    start = time.perf_counter()
    summary = caption_dir(cap, folder, out, batch_size=batch_size, workers=workers, progress=False,
                          options=cap.options(**options))
    seconds = time.perf_counter() - start
    if summary.errors or summary.captioned != summary.total:
        raise RuntimeError(f"caption-dir did not caption every photo: {summary}")
    return seconds


def _extract(cap: Captioner, examples: list[Example], engine: str, workers: int, tmp: Path) -> float:
    cache = tmp / f"features_{time.perf_counter_ns()}"
    return _seconds(lambda: extract(cap.encoder, examples, cache, "bench", batch_size=64, num_workers=workers,
                                    engine=engine))


def _stages(cap: Captioner | Runtime, files: list[Path], batch_size: int) -> dict[str, float]:
    """Seconds per photo of each stage alone: load + preprocess, encoder, search (tags, beam search, formatting)."""
    n = len(files)
    load = _seconds(lambda: [cap.preprocess(f) for f in files]) / n
    pixels = cap.stack([cap.preprocess(f) for f in files])
    feats = []
    encode = _seconds(lambda: feats.extend(cap.encode(pixels[i:i + batch_size]) for i in range(0, n, batch_size))) / n
    search = _seconds(lambda: [cap.describe(f) for f in feats]) / n
    return {"load": load, "encoder": encode, "search": search}


def _pipeline(cap: Captioner | Runtime, files: list[Path], folder: Path, batch_size: int, workers: int,
              tmp: Path) -> tuple[float, dict[str, float], float]:
    """caption-dir images/s, its stages alone (_stages) and caption-dir ÷ the best they allow, in one repeat."""
    rate = len(files) / _caption_dir(cap, folder, batch_size, workers, tmp)
    stages = _stages(cap, files, batch_size)
    return rate, stages, rate * sum(stages.values())


def run(checkpoint: str | Path | None = None, n_images: int = 200, batch_size: int = 32, workers: int = 2,
        repeats: int = 5, latency_images: int = 50, device: str = "cpu") -> dict:
    """Measure on the first n_images Flickr8k photos; returns the figures as a dict."""
    caps = {e: Captioner.load(checkpoint, device=device, engine=e) for e in ENGINES}
    files = photos(max(n_images, latency_images))
    examples = [Example(f.name, f) for f in files[:n_images]]
    # What the CLI, demo and service caption with on a CPU: the bundle in the torch-free runtime.
    runtime = bundles.load(checkpoint, device=device)
    for cap in [*caps.values(), runtime]:
        cap.caption(files[:2])  # warm-up: the ONNX export or cache check, first kernels, allocations
    cdir = {e: [] for e in ENGINES}
    unguided = []  # caption-dir images/s with --guide off, default engine
    ext = {e: [] for e in ENGINES}
    pipeline = {"captioner": [], "runtime": []}  # per repeat: _pipeline's (images/s, stages, efficiency)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "photos"
        folder.mkdir()
        for f in files[:n_images]:  # links, not copies: caption-dir reads the real photos
            (folder / f.name).symlink_to(f)
        for _ in range(repeats):
            for e, cap in caps.items():
                cdir[e].append(n_images / _caption_dir(cap, folder, batch_size, workers, tmp))
                ext[e].append(n_images / _extract(cap, examples, e, workers, tmp))
            unguided.append(n_images / _caption_dir(caps["auto"], folder, batch_size, workers, tmp, guide="off"))
            for name, cap in (("captioner", caps["auto"]), ("runtime", runtime)):
                pipeline[name].append(_pipeline(cap, files[:n_images], folder, batch_size, workers, tmp))
    latencies = {e: [] for e in [*ENGINES, "unguided", "runtime", "runtime_unguided"]}
    for f in files[:latency_images]:
        for e, cap in caps.items():
            latencies[e].append(_seconds(lambda cap=cap, f=f: cap.caption(f)) * 1000)
        latencies["unguided"].append(_seconds(lambda f=f: caps["auto"].caption(f, guide="off")) * 1000)
        latencies["runtime"].append(_seconds(lambda f=f: runtime.caption(f)) * 1000)
        latencies["runtime_unguided"].append(_seconds(lambda f=f: runtime.caption(f, guide="off")) * 1000)
    med = statistics.median
    d = caps["auto"].config.decode
    r = {
        "caption_dir_speedup": round(med(a / b for a, b in zip(cdir["auto"], cdir["torch"])), 2),
        "extract_speedup": round(med(a / b for a, b in zip(ext["auto"], ext["torch"])), 2),
        "latency_p50_ms": round(float(np.percentile(latencies["auto"], 50)), 1),
        "latency_p95_ms": round(float(np.percentile(latencies["auto"], 95)), 1),
        "pipeline_efficiency": round(med(e for _, _, e in pipeline["captioner"]), 3),
        "pipeline_efficiency_runtime": round(med(e for _, _, e in pipeline["runtime"]), 3),
        "caption_dir_images_per_s_runtime": round(med(r for r, _, _ in pipeline["runtime"]), 1),
        "guide_caption_dir_ratio": round(med(a / b for a, b in zip(cdir["auto"], unguided)), 2),
        "guide_latency_ratio": round(float(np.percentile(latencies["auto"], 50)
                                           / np.percentile(latencies["unguided"], 50)), 2),
        "caption_dir_images_per_s_unguided": round(med(unguided), 1),
        "latency_p50_ms_unguided": round(float(np.percentile(latencies["unguided"], 50)), 1),
        "runtime": type(runtime).__name__,
        "latency_p50_ms_runtime": round(float(np.percentile(latencies["runtime"], 50)), 1),
        "latency_p50_ms_runtime_unguided": round(float(np.percentile(latencies["runtime_unguided"], 50)), 1),
        "engine": resolve_engine("auto", caps["auto"].device),
    }
    for e, name in (("auto", "default"), ("torch", "torch")):
        r |= {f"caption_dir_images_per_s_{name}": round(med(cdir[e]), 1),
              f"extract_images_per_s_{name}": round(med(ext[e]), 1),
              f"latency_p50_ms_{name}": round(float(np.percentile(latencies[e], 50)), 1)}
    for name, suffix in (("captioner", ""), ("runtime", "_runtime")):
        r |= {f"stage_ms_{k}{suffix}": round(med(s[k] for _, s, _ in pipeline[name]) * 1000, 2)
              for k in pipeline[name][0][1]}
    r |= {"n_images": n_images, "batch_size": batch_size, "workers": workers, "repeats": repeats,
          "latency_images": latency_images, "decode": f"beam {d.beam_size}, {d.length_penalty} {d.alpha}, "
          f"max_len {d.max_len}", "device": str(caps["auto"].device), "torch_threads": torch.get_num_threads()}
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", "-c", default=None, help="default: the shipped model")
    p.add_argument("--images", type=int, default=200, help="photos for the throughput runs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--latency-images", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args(argv)
    if args.checkpoint is None and not DEFAULT_CHECKPOINT.is_file():
        print(f"The default model is not installed ({DEFAULT_CHECKPOINT}); pass --checkpoint "
              "(e.g. runs/flickr8k_lite0/best.pt).", file=sys.stderr)
        return 2
    try:
        r = run(args.checkpoint, args.images, args.batch_size, args.workers, args.repeats, args.latency_images,
                args.device)
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
