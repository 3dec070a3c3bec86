"""The torch-free runtime (captioner.runtime) beside the torch `Captioner`, on the same real photos in one run.

Reports how many captions are identical, images/s over all photos (batches of 32, from the
JPEG files), single-image latency (one photo per call, median), and the decoder step's
latency for a beam of k rows. Both paths use the same number of threads. On a shared
machine only the ratios mean something: every number here is measured side by side.

    python scripts/bench_runtime.py --bundle /tmp/bundle --images 200
    python scripts/bench_runtime.py --bundle /tmp/bundle --compare /tmp/bundle-int8   # what int8 changes
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from captioner import Captioner
from captioner.export import export
from captioner.runtime import Runtime


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def step_latency(rt: Runtime, rows: int, reps: int) -> float:
    """Median seconds of one decoder step for `rows` beams."""
    ctx, *state = rt.init.run(None, {"features": np.random.default_rng(0).random((1, rt.manifest["decoder"]
                                                                                  ["feature_size"]), np.float32)})
    ctx, state = np.repeat(ctx, rows, 0), [np.repeat(s, rows, 1) for s in state]
    tokens = np.full(rows, rt.vocab.start)
    times = [timed(rt._step, ctx, tokens, state)[1] for _ in range(reps)]
    return statistics.median(times)


def agreement(a: list[dict], b: list[dict]) -> dict:
    same = [x["caption"] == y["caption"] for x, y in zip(a, b)]
    diffs = [abs(x["score"] - y["score"]) for x, y, s in zip(a, b, same) if s]
    return {"identical": sum(same), "of": len(same), "max_score_diff": max(diffs, default=None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle folder (exported from the shipped model if missing)")
    p.add_argument("--compare", default=None, help="a second bundle (e.g. --int8-decoder): its step latency and "
                   "how many captions change")
    p.add_argument("--data", default="../shared/data/flickr8k", help="Flickr8k folder")
    p.add_argument("--images", type=int, default=200, help="dev photos to caption")
    p.add_argument("--latency-images", type=int, default=20, help="photos captioned one per call")
    p.add_argument("--repeats", type=int, default=2, help="runs of each path over all photos (best is kept)")
    args = p.parse_args()

    if not (Path(args.bundle) / "bundle.json").is_file():
        export(None, args.bundle)
    data = Path(args.data)
    names = (data / "Flickr_8k.devImages.txt").read_text().split()[:args.images]
    photos = [str(data / "Flicker8k_Dataset" / n) for n in names]
    threads = torch.get_num_threads()
    cap = Captioner.load(device="cpu")
    rt = Runtime(args.bundle, threads=threads)
    cap.caption(photos[:2]), rt.caption(photos[:2])  # warm up: sessions, first-call allocations

    # Alternate the two paths so that a change in the machine's load hits both alike.
    t_torch, t_rt = [], []
    for _ in range(args.repeats):
        by_torch, t = timed(cap.caption, photos)
        t_torch.append(t)
        by_rt, t = timed(rt.caption, photos)
        t_rt.append(t)
    lat_torch, lat_rt = [], []
    for photo in photos[:args.latency_images]:
        lat_torch.append(timed(cap.caption, photo)[1])
        lat_rt.append(timed(rt.caption, photo)[1])
    k = rt.config.beam_size
    report = {
        "cpu": cpu_name(), "threads": threads, "photos": len(photos), "beam_size": k,
        "agreement": agreement(by_torch, by_rt),
        "images_per_s": {"torch_captioner": len(photos) / min(t_torch), "runtime": len(photos) / min(t_rt)},
        "latency_ms_median": {"torch_captioner": 1e3 * statistics.median(lat_torch),
                              "runtime": 1e3 * statistics.median(lat_rt)},
        "step_ms_median": {"runtime": 1e3 * step_latency(rt, k, 300)},
    }
    report["ratio_runtime_over_torch"] = {
        "images_per_s": report["images_per_s"]["runtime"] / report["images_per_s"]["torch_captioner"],
        "latency": report["latency_ms_median"]["runtime"] / report["latency_ms_median"]["torch_captioner"]}
    if args.compare:
        other = Runtime(args.compare, threads=threads)
        report["step_ms_median"]["compare"] = 1e3 * step_latency(other, k, 300)
        report["step_ms_median"]["runtime_again"] = 1e3 * step_latency(rt, k, 300)
        report["compare_agreement_with_runtime"] = agreement(by_rt, other.caption(photos))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
