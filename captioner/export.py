"""`captioner export`: a model as a bundle that captions without torch (captioner.runtime).

The bundle is a folder: encoder.onnx (pixels -> v), decoder_init.onnx (v -> the step
context and the initial recurrent state, once per image), decoder_step.onnx (one token
for N rows -> log-probabilities and the next state), for an encoder with an ImageNet
classifier tagger.npz (its weight and bias) and imagenet_nouns.tsv (its noun mapping), and
bundle.json (vocabulary, preprocessing, decoding defaults, model config, SHA-256 of each
file, format version).
The decoding loop itself (greedy, beam search) lives in captioner.runtime; docs/deploy.md
describes every graph's inputs and outputs for writing that loop in another language.

Models the graphs cannot represent are refused, never exported as a different model:
an ensemble (several decoders averaged per step) and the attention decoder.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import transforms as T

from . import __version__, encoder_engine
from .decoder import AttentionDecoder, Decoder, Ensemble
from .encoders import DRAFT_SIZE
from .files import DEFAULT_CHECKPOINT, UMASK, file_sha256, fsync_dir
from .inference import Captioner
from .runtime import FORMAT, FORMAT_VERSION, MANIFEST, OPTIONS, ROUTE
from .tags import MAPPING

PARTIAL = ".export-partial-"  # the work folder's prefix inside the bundle folder
FILES = {"encoder": "encoder.onnx", "decoder_init": "decoder_init.onnx", "decoder_step": "decoder_step.onnx"}
TAGGER_FILES = {"tagger": "tagger.npz", "tag_mapping": "imagenet_nouns.tsv"}


class ExportError(ValueError):
    """The model cannot be exported as a bundle; the message says why."""


class _Init(nn.Module):
    """features (B, width) -> step context (B, C) and the initial state, zeros where the decoder starts from none."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, features):
        d = self.decoder
        v = d.features(features)
        state = d.initial_state(v)
        if state is None:
            state = tuple(v.new_zeros(d.num_layers, v.shape[0], d.rnn.hidden_size, dtype=torch.float32)
                          for _ in range(2 if d.cell == "lstm" else 1))
        return (d.step_context(v), *(state if isinstance(state, tuple) else (state,)))


class _Step(nn.Module):
    """tokens (N,), context (N, C), state (L, N, H) each -> log-probs (N, V), the next state."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens, context, state):
        logp, new = self.decoder.step(context, tokens, state if len(state) > 1 else state[0])
        return (logp, *(new if isinstance(new, tuple) else (new,)))


def preprocessing(transform) -> dict:
    """The encoder's torchvision transform as numbers the runtime applies with Pillow and numpy."""
    steps = transform.transforms if isinstance(transform, T.Compose) else [transform]
    kinds = [type(s) for s in steps]
    if kinds != [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]:
        raise ExportError(f"the encoder's preprocessing {[k.__name__ for k in kinds]} is not "
                          "Resize, CenterCrop, ToTensor, Normalize: the runtime cannot reproduce it")
    resize, crop, _, norm = steps
    size = resize.size if isinstance(resize.size, int) else resize.size[0]
    crop_size = crop.size[0]
    if (not isinstance(resize.size, int) and len(resize.size) != 1) or resize.max_size is not None \
            or resize.interpolation != T.InterpolationMode.BILINEAR or crop.size[0] != crop.size[1] or crop_size > size:
        raise ExportError(f"the runtime reproduces only Resize(shorter side, bilinear) then a square CenterCrop no "
                          f"larger than it; this encoder has {resize} then {crop}")
    return {"resize": size, "crop": crop_size, "interpolation": "bilinear", "draft_size": DRAFT_SIZE,
            "scale": 1 / 255, "mean": list(map(float, norm.mean)), "std": list(map(float, norm.std)),
            "layout": "NCHW, RGB, float32"}


def check_exportable(decoder) -> None:
    if isinstance(decoder, Ensemble):
        raise ExportError(f"an ensemble of {len(decoder.members)} decoders cannot be exported as one bundle: export "
                          "one member, or average them into one decoder (scripts/combine_checkpoints.py --average)")
    if isinstance(decoder, AttentionDecoder):
        raise ExportError("the attention decoder (model.attention) cannot be exported yet: its step needs the "
                          "image's regions and the runtime's graphs carry one feature vector per image")
    if not isinstance(decoder, Decoder):
        raise ExportError(f"cannot export a {type(decoder).__name__}")


def _export_decoder(decoder: Decoder, width: int, folder: Path) -> tuple[list[str], int]:
    """Write the init and step graphs; returns the state's names (h, c for an LSTM; h otherwise), the context size."""
    names = ["h", "c"] if decoder.cell == "lstm" else ["h"]
    rows = torch.export.Dim("rows")
    feats = torch.randn(3, width)
    ctx, *state = _Init(decoder)(feats)
    encoder_engine.export_onnx(_Init(decoder), (feats,), folder / FILES["decoder_init"], input_names=["features"],
                       output_names=["context", *names], dynamic_shapes={"features": {0: rows}})
    tokens = torch.tensor([1, 4, 5])
    # Distinct example tensors: the exporter would merge inputs given as one tensor (zeros for h and c) into one.
    state = tuple(torch.randn_like(s) for s in state)
    encoder_engine.export_onnx(_Step(decoder), (tokens, ctx, state), folder / FILES["decoder_step"],
                       input_names=["tokens", "context", *names],
                       output_names=["logprobs", *(f"new_{n}" for n in names)],
                       dynamic_shapes={"tokens": {0: rows}, "context": {0: rows},
                                       "state": tuple({1: rows} for _ in names)})
    return names, ctx.shape[1]


def quantize_step(path: Path) -> None:
    """The step graph's weights as int8, activations quantized per call (onnxruntime's dynamic quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(".int8.tmp")
    quantize_dynamic(path, tmp, weight_type=QuantType.QInt8)
    os.replace(tmp, path)


def half_where_exact(a: np.ndarray) -> np.ndarray:
    """A float32 array as float16 where float16 holds every value bit for bit (a checkpoint saved in fp16), else a."""
    if a.dtype != np.float32:
        return a
    half = a.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32).view(np.uint32), a.view(np.uint32)) else a


def store_half(path: Path) -> None:
    """Rewrite the graph's float32 weights that float16 holds exactly as float16, each cast back by a Cast node
    onnxruntime folds when the session loads: half the bytes, the same numbers, the same outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(path)
    graph = model.graph
    inputs = {i.name for i in graph.input}  # an initializer listed as an input can be fed: left as it is
    casts = []
    for tensor in graph.initializer:
        weight = numpy_helper.to_array(tensor)
        half = half_where_exact(weight)
        if half is weight or weight.size < 1024 or tensor.name in inputs:
            continue
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(half, f"{name}.fp16"))
        casts.append(helper.make_node("Cast", [f"{name}.fp16"], [name], name=f"{name}.cast", to=TensorProto.FLOAT))
    if casts:
        nodes = [*casts, *graph.node]
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.save(model, path)


def _manifest(cap: Captioner, work: Path, files: dict, prep: dict, state: list[str], context_size: int,
              int8_decoder: bool, checkpoint: str | Path | None) -> dict:
    config, decoder = cap.config, cap.decoder
    made_by = {"captioner": __version__, "torch": torch.__version__, "opset": encoder_engine.OPSET, "source": "",
               "checkpoint_sha256": ""}
    if checkpoint is not None:
        made_by |= {"source": Path(checkpoint).name, "checkpoint_sha256": file_sha256(checkpoint)}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "made_by": made_by,
        "files": {name: {"path": path, "sha256": file_sha256(work / path)} for name, path in files.items()},
        "vocab": cap.vocab.to_dict(),
        "preprocess": prep,
        # method, engine and precision: the checkpoint's own settings, which say whether the runtime
        # (beam or greedy, fp32, onnxruntime) serves it as the torch Captioner would (captioner.bundles).
        "decode": {**{name: getattr(config.decode, name) for name in OPTIONS}, "banned": list(cap.vocab.banned),
                   "start": cap.vocab.start, "end": cap.vocab.end,
                   **{name: getattr(config.decode, name) for name in ROUTE}},
        "decoder": {"state": state, "state_shape": [decoder.num_layers, "rows", decoder.rnn.hidden_size],
                    "int8_step": int8_decoder,
                    "context_size": context_size,
                    "feature_size": cap.encoder.width, "vocab_size": decoder.vocab_size},
        "model": dataclasses.asdict(config.model),
        **({"tags": {"regions": cap.tagger.regions}} if cap.tagger is not None else {}),
    }


def export_bundle(cap: Captioner, out: str | Path, *, checkpoint: str | Path | None = None,
                  int8_decoder: bool = False) -> Path:
    """Write `cap`'s model as a bundle into the folder `out` (created if missing; an older bundle there is
    replaced, and anything else in the folder is left as it is).

    checkpoint: the file `cap` was loaded from, whose SHA-256 the manifest records.
    int8_decoder: quantize the step graph (smaller and faster, and a few captions change: docs/deploy.md)."""
    check_exportable(cap.decoder)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder: choose a folder for the bundle")
    if out.exists() and not (out / MANIFEST).is_file() and any(not f.name.startswith(PARTIAL) for f in out.iterdir()):
        raise ExportError(f"{out} exists and is not a bundle: choose a new or empty folder")
    prep = preprocessing(cap.encoder.transform)
    # CPU fp32 copies (the caller's Captioner stays as it is): a bf16 decode.precision is a torch
    # speed setting, the graphs compute in fp32.
    encoder, decoder = (copy.deepcopy(m).float().cpu().eval() for m in (cap.encoder, cap.decoder))
    out.mkdir(parents=True, exist_ok=True)
    # Written inside `out`, so each finished file is renamed into place on the same file system.
    work = Path(tempfile.mkdtemp(dir=out, prefix=PARTIAL))
    try:
        shutil.copyfile(encoder_engine.encoder_onnx(encoder), work / FILES["encoder"])
        state, context_size = _export_decoder(decoder, encoder.width, work)
        if int8_decoder:
            quantize_step(work / FILES["decoder_step"])
        for name in FILES.values():
            store_half(work / name)
        files = dict(FILES)
        if cap.tagger is not None:
            np.savez(work / TAGGER_FILES["tagger"], weight=half_where_exact(cap.tagger.weight),
                     bias=half_where_exact(cap.tagger.bias))
            shutil.copyfile(MAPPING, work / TAGGER_FILES["tag_mapping"])
            files |= TAGGER_FILES
        manifest = _manifest(cap, work, files, prep, state, context_size, int8_decoder, checkpoint)
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
        # The graphs first, the manifest last: a reader in between finds graphs that do not match
        # their SHA-256 in the old manifest and refuses them (BundleError), never a mixed model.
        for name in [*files.values(), MANIFEST]:
            with open(work / name, "rb+") as f:
                os.fsync(f.fileno())
            (work / name).chmod(0o666 & ~UMASK)  # the temporary files were private (0600): a bundle is for sharing
            os.replace(work / name, out / name)
        fsync_dir(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def export(checkpoint_path: str | Path | None, out: str | Path, *, int8_decoder: bool = False) -> Path:
    """Load a checkpoint (None: the shipped model) and write its bundle."""
    cap = Captioner.load(checkpoint_path, device="cpu", engine="torch")
    return export_bundle(cap, out, checkpoint=checkpoint_path or DEFAULT_CHECKPOINT, int8_decoder=int8_decoder)
