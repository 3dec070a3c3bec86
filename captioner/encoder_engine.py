"""What runs the frozen encoder at inference: torch, or onnxruntime on the same weights.

On a CPU the encoder is most of every inference path's cost, and onnxruntime runs the
same EfficientNet several times faster than torch eager. The ONNX file is exported
from the encoder's own weights at first use, into a per-user cache named by a checksum
of those weights (so a fine-tuned encoder gets its own file and a changed one never
reuses a stale file). It is not shipped: exporting takes seconds, works for every
checkpoint, and keeps the package one weights file smaller. Beside each file a small
JSON holds its SHA-256; a file that does not match (torn, corrupted) is exported again,
never trusted.

    run = encoder_runner(encoder, "onnxruntime")   # pixels (B, 3, H, W) -> features (B, width)
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from . import ort
from .encoders import Encoder
from .files import atomic_path, cache_dir, file_sha256, write_atomic

ENGINES = ("auto", "onnxruntime", "torch")
# Bump when the exported graph changes for the same weights (opset, input/output names).
EXPORT_FORMAT = 1
OPSET = 18


class EngineError(RuntimeError):
    """The asked-for engine cannot run here; the message says what to do."""


def resolve_engine(engine: str, device: torch.device) -> str:
    """auto -> onnxruntime on a CPU, torch on a GPU (where torch is fast and onnxruntime-gpu is not installed)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "auto":
        return "onnxruntime" if device.type == "cpu" else "torch"
    if engine == "onnxruntime" and device.type != "cpu":
        raise EngineError(f"--engine onnxruntime runs on the CPU; use --engine torch for device {device}")
    return engine


def weights_checksum(module: torch.nn.Module) -> str:
    """SHA-256 over the module's parameter and buffer names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_onnx(module: torch.nn.Module, example: tuple, path: str | Path, *, input_names: list[str],
                output_names: list[str], dynamic_shapes) -> None:
    """torch.onnx.export (the torch.export-based exporter) into `path`, atomically."""
    with torch.no_grad(), warnings.catch_warnings():
        # The exporter warns about its own internals (deprecations it has not yet followed); not ours to fix.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), example, dynamo=True, verbose=False, opset_version=OPSET,
                                    input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, external_data=False)
    with atomic_path(path) as tmp:
        program.save(str(tmp))


def encoder_onnx(encoder: Encoder, folder: str | Path | None = None) -> Path:
    """The encoder's ONNX file in the cache, exported now if it is missing, stale or corrupt."""
    folder = Path(folder) if folder is not None else cache_dir("onnx")
    key = hashlib.sha256(f"{encoder.name}:{encoder.regions}:{EXPORT_FORMAT}:{OPSET}:"
                         f"{weights_checksum(encoder)}".encode()).hexdigest()[:24]
    path = folder / f"{encoder.name}-{key}.onnx"
    meta = path.with_suffix(".json")

    def valid() -> bool:
        try:
            return json.loads(meta.read_text())["sha256"] == file_sha256(path)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    if valid():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    # One exporter at a time per file: a second process waits, then finds the file valid.
    with open(folder / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not valid():
            example = (torch.zeros(2, 3, encoder.input_size, encoder.input_size),)
            export_onnx(encoder, example, path, input_names=["pixels"], output_names=["features"],
                        dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
            write_atomic(meta, json.dumps({"sha256": file_sha256(path), "encoder": encoder.name,
                                           "torch": torch.__version__, "opset": OPSET}))
    return path


def encoder_runner(encoder: Encoder, engine: str = "auto", device: torch.device = torch.device("cpu"),
                   threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """pixels (B, 3, H, W) -> features (B, encoder.width), float32, run by `engine`.

    Under "auto" an onnxruntime that cannot start (package missing, export failing) falls back
    to torch with a warning; asked for by name, it raises instead.
    """
    if resolve_engine(engine, device) == "onnxruntime":
        try:
            session = ort.session(encoder_onnx(encoder), threads)
        except Exception as e:
            if engine != "auto":
                if isinstance(e, ImportError):
                    raise EngineError("the onnxruntime engine needs the 'onnxruntime' package: pip install "
                                      "onnxruntime (or use --engine torch)") from e
                raise
            warnings.warn(f"the onnxruntime encoder engine is unavailable ({type(e).__name__}: {e}); "
                          "running the encoder in torch, several times slower", stacklevel=2)
        else:
            def run(pixels: torch.Tensor) -> torch.Tensor:
                array = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
                try:
                    return torch.from_numpy(ort.encode(session, array))
                except Exception as e:  # onnxruntime's own types: callers see what the torch engine raises
                    raise RuntimeError(f"encoder (onnxruntime): {e}") from e

            return run
    encoder = encoder.eval().to(device)

    @torch.inference_mode()
    def run(pixels: torch.Tensor) -> torch.Tensor:
        return encoder(pixels.to(device))

    return run
