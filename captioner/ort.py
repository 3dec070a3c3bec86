"""onnxruntime sessions: the one place their threads are chosen, for the encoder engine and the runtime.

Torch-free (onnxruntime, numpy, the standard library), so both torch's side (captioner.encoder_engine) and
the torch-free runtime (captioner.runtime) import it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

# Images per encoder run. EfficientNet-Lite0 on 2 threads of a 2-core Xeon, time per image against
# batches of 32: 0.96 at 4 (one image: 1.06, each run's threads wake and wait for each other), and
# 0.74 at 4 when other jobs hold a core (one image: 0.70-0.75).
ENCODER_CHUNK = 4


def default_threads() -> int:
    """Threads for a session that asks for none: torch's intra-op count when torch is loaded, so both
    engines share the same cores and torch.set_num_threads limits both; else 0, onnxruntime's own
    choice of one per physical core (torch's default too)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else 0


def session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session on `threads` intra-op threads (None: default_threads()).

    Its threads sleep between runs: spinning for the next call takes the cores from the search and
    the image-decoding workers that run between encoder calls (caption-dir ran ~1.4x faster without;
    the runtime's single-image latency was 3x with spinning on a loaded 2-core machine)."""
    import onnxruntime as ort  # here, not at the top: engine imports this module where onnxruntime may be missing

    options = ort.SessionOptions()
    options.intra_op_num_threads = default_threads() if threads is None else threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def encode(session, pixels: np.ndarray) -> np.ndarray:
    """An encoder graph's features (B, width) of pixels (B, 3, H, W), float32, run ENCODER_CHUNK images at a time.

    A few images' activations stay in the caches where a batch's spill to memory, and the small
    arena this leaves gives a fork of the process (caption-dir's readers) few pages to make
    copy-on-write. The features are the same to the bit: within a batch, too, each image is
    computed alone."""
    pixels = np.ascontiguousarray(pixels, np.float32)
    if len(pixels) <= ENCODER_CHUNK:
        return session.run(None, {"pixels": pixels})[0]
    return np.concatenate([session.run(None, {"pixels": pixels[i:i + ENCODER_CHUNK]})[0]
                           for i in range(0, len(pixels), ENCODER_CHUNK)])
