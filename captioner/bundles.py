"""What serves caption, caption-dir, alt-text, demo and serve: a bundle in onnxruntime, or the torch Captioner.

On a CPU the bundle (`captioner export`'s three ONNX graphs, captioned by captioner.runtime)
gives the torch Captioner's captions without importing torch, which is most of a cold
start. The shipped model's bundle ships beside it (SHIPPED) and serves while its manifest names
the SHA-256 of the shipped checkpoint file. Any other checkpoint's bundle (the shipped model's too,
once its file is replaced) is made from the checkpoint at its first use, like the encoder's ONNX
file, into $CAPTIONER_CACHE/bundles/<checkpoint>-<key>/ (key: the SHA-256 of the checkpoint file,
so a changed checkpoint never reuses a stale bundle), with <checkpoint>-<key>.json beside it saying
what the checkpoint's decoding settings are, or why it has no bundle. Making one needs torch
(the training extra) and says so in one line; it needs no network.

The torch Captioner serves instead on a GPU, with --engine torch or bf16 precision, for a
model whose settings the runtime does not follow (sampling or greedy by default) and for a
model the graphs cannot represent (an ensemble, the attention decoder).
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

from .files import DEFAULT_CHECKPOINT, cache_dir, file_sha256, write_atomic
from .runtime import MANIFEST, ROUTE, BundleError, Runtime

ROUTE_FORMAT = 1  # of <checkpoint>-<key>.json
# Made by `captioner export --out captioner/assets/flickr8k_lite0.bundle` whenever the shipped checkpoint changes.
SHIPPED = DEFAULT_CHECKPOINT.with_suffix(".bundle")


def gpu_visible() -> bool:
    """Whether torch might see a GPU, judged without importing torch: an NVIDIA or AMD GPU driver is
    loaded and CUDA_VISIBLE_DEVICES does not hide every device. True only means: ask torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    nvidia = Path("/proc/driver/nvidia/gpus")
    return (nvidia.is_dir() and any(nvidia.iterdir())) or Path("/dev/kfd").exists()


def load(path: str | Path | None = None, device: str = "auto", precision: str | None = None,
         engine: str | None = None):
    """A captioner for the checkpoint `path` (None: the shipped model) with Captioner.load's arguments:
    a runtime.Runtime on the checkpoint's bundle where it gives the Captioner's captions, else the Captioner.
    Both have caption(images, n_best=, beam_size=, max_len=, length_penalty=)."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    on_cpu = device == "cpu" or (device == "auto" and not gpu_visible())
    if on_cpu and engine in (None, "auto", "onnxruntime") and precision in (None, "fp32") and path.is_file():
        sha = file_sha256(path)
        folder, route = _shipped(path, sha) or _cached(path, sha)
        if route is None:
            folder, route = _prepare(path, sha)
        if route["bundle"] and (engine or route["engine"]) != "torch" and (precision or route["precision"]) == "fp32" \
                and route["method"] == "beam":
            try:
                return Runtime(folder)
            except BundleError:  # corrupt or changed since: made again
                return Runtime(_prepare(path, sha)[0])
    from .inference import Captioner

    return Captioner.load(path, device=device, precision=precision, engine=engine)


def _shipped(checkpoint: Path, sha: str) -> tuple[Path, dict] | None:
    """The shipped bundle and its route, for the shipped checkpoint file it was made from; else None."""
    if checkpoint.resolve() != DEFAULT_CHECKPOINT.resolve():
        return None
    try:
        manifest = json.loads((SHIPPED / MANIFEST).read_text())
        if manifest["made_by"]["checkpoint_sha256"] != sha:
            return None  # made from another checkpoint: this one is exported into the cache instead
        return SHIPPED, {"bundle": True, **{name: manifest["decode"][name] for name in ROUTE}}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _paths(checkpoint: Path, sha: str) -> tuple[Path, Path]:
    folder = cache_dir("bundles") / f"{checkpoint.stem}-{sha[:24]}"
    return folder, folder.with_suffix(".json")


def _cached(checkpoint: Path, sha: str) -> tuple[Path, dict | None]:
    folder, route_path = _paths(checkpoint, sha)
    try:
        route = json.loads(route_path.read_text())
    except (OSError, ValueError):
        return folder, None
    return folder, route if isinstance(route, dict) and route.get("format") == ROUTE_FORMAT else None


def _prepare(checkpoint: Path, sha: str) -> tuple[Path, dict]:
    """Export the checkpoint's bundle into the cache (one process at a time), and note its decoding settings."""
    folder, route_path = _paths(checkpoint, sha)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / (folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _, route = _cached(checkpoint, sha)
        if route is not None and (not route["bundle"] or _intact(folder)):
            return folder, route  # another process made it while this one waited
        # Imported first: without torch, the one line the user reads is the training extra's advice.
        from .export import ExportError, export_bundle
        from .inference import Captioner

        print(f"captioner: preparing {checkpoint.name} for onnxruntime, once per checkpoint (about a minute): "
              f"{folder}", file=sys.stderr, flush=True)
        cap = Captioner.load(checkpoint, device="cpu", engine="torch")
        d = cap.config.decode
        route = {"format": ROUTE_FORMAT, "engine": d.engine, "precision": d.precision, "method": d.method,
                 "bundle": True, "reason": ""}
        try:
            export_bundle(cap, folder, checkpoint=checkpoint)
        except ExportError as e:
            route |= {"bundle": False, "reason": str(e)}
        write_atomic(route_path, json.dumps(route))
    return folder, route


def _intact(folder: Path) -> bool:
    try:
        Runtime(folder)
    except BundleError:
        return False
    return True
