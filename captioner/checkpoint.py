"""One-file checkpoints: weights, config and vocabulary as plain tensors, dicts and lists.

Everything in the file loads with `torch.load(weights_only=True)`: no pickled
classes, so loading a checkpoint never runs code. Pretrained encoder weights that
come from torchvision or a package are referenced by the encoder's name in the
config, not copied; only a fine-tuned encoder's weights are stored. "decoder" is one
state dict, or a list of them for an ensemble (`decoder.Ensemble`).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from .config import Config
from .errors import CheckpointError
from .files import atomic_path

FORMAT = "captioner-checkpoint/1"


def save(path: str | Path, *, config: dict, vocab: dict, decoder: dict | list[dict], encoder: dict | None = None,
         train_state: dict | None = None, half: bool = False) -> None:
    """Write atomically (temp file + rename): a crash never leaves a torn checkpoint.

    half=True stores floating weights as fp16 (the shipped model: half the size);
    `load` returns them as fp32.
    """
    def maybe_half(sd):
        return {k: (t.half() if half and t.is_floating_point() else t) for k, t in sd.items()}

    decoder = [maybe_half(sd) for sd in decoder] if isinstance(decoder, list) else maybe_half(decoder)
    payload = {"format": FORMAT, "config": config, "vocab": vocab, "decoder": decoder}
    if encoder is not None:
        payload["encoder"] = maybe_half(encoder)
    if train_state is not None:
        payload["train_state"] = train_state
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def ensemble(payloads: list[dict], names: list[str]) -> dict:
    """The `save` arguments of one model decoding with all the given models' decoders, once they
    are checked to fit together (the first one's config is kept). `average` combines the same way."""
    first = payloads[0]
    # Compared as loaded: a checkpoint saved before a model field existed has that field's default.
    model = [Config.from_dict(p["config"]).model for p in payloads]
    for p, m, name in zip(payloads[1:], model[1:], names[1:]):
        if p["vocab"] != first["vocab"]:
            raise CheckpointError(f"{name} has another vocabulary than {names[0]}: they cannot be combined")
        if m != model[0]:
            raise CheckpointError(f"{name} has another model config than {names[0]}: they cannot be combined")
    if any(isinstance(p["decoder"], list) for p in payloads):
        raise CheckpointError("ensembles cannot be combined again: combine their members' checkpoints")
    # One encoder runs for all the decoders: the pretrained one, or one fine-tuned encoder they all share
    # (self-critical runs on the features of a model whose encoder's top was trained, say).
    encoder = first.get("encoder")
    for p, name in zip(payloads[1:], names[1:]):
        other = p.get("encoder")
        if (encoder is None) != (other is None) or (encoder is not None and (
                encoder.keys() != other.keys() or not all(torch.equal(encoder[k], other[k]) for k in encoder))):
            raise CheckpointError(f"{name} has another encoder than {names[0]} (a fine-tuned one, or another "
                                  "fine-tuning of it): only models on one shared encoder can be combined")
    merged = {"config": first["config"], "vocab": first["vocab"], "decoder": [p["decoder"] for p in payloads]}
    return merged if encoder is None else {**merged, "encoder": encoder}


def average(payloads: list[dict], names: list[str], weights: list[float] | None = None) -> dict:
    """The `save` arguments of one model whose decoder weights are the mean of the given
    models' (a "model soup", Wortsman et al. 2022), or their weighted mean. Meant for models
    fine-tuned from one start, e.g. self-critical runs with other seeds: their mean decodes at
    one decoder's cost and scores like a small ensemble; a cross-entropy model and its
    self-critical soup, weighted, give the points between the two. Models trained from scratch
    apart do not average."""
    merged = ensemble(payloads, names)  # the same checks
    members = merged["decoder"]
    weights = weights or [1.0] * len(members)
    if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
        raise CheckpointError(f"{len(members)} models need {len(members)} non-negative weights, got {weights}")
    weights = [w / sum(weights) for w in weights]
    mean = {k: sum(w * sd[k] for w, sd in zip(weights, members)) if members[0][k].is_floating_point()
            else members[0][k] for k in members[0]}
    return {**merged, "decoder": mean}


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # what torch.save writes; else torch.load's error would blame pickles
        raise CheckpointError(f"{path} is not a checkpoint file (not a torch.save archive)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds pickled Python objects, which captioner refuses to load "
            f"(loading them could run arbitrary code): {str(e).splitlines()[0]}"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a checkpoint file (torch.load failed: {type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a captioner checkpoint (expected format {FORMAT!r})")
    def as_fp32(sd):
        return {k: (t.float() if t.is_floating_point() else t) for k, t in sd.items()}

    if "encoder" in payload:
        payload["encoder"] = as_fp32(payload["encoder"])
    dec = payload["decoder"]
    payload["decoder"] = [as_fp32(sd) for sd in dec] if isinstance(dec, list) else as_fp32(dec)
    return payload
