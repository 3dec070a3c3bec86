"""Feature cache: run the frozen encoder once per image and keep v on disk (or, with
train.encoder_top_blocks, the maps below the cut: `cached_part`), for training and fine-tuning.

Layout per split, in the cache folder:
  {split}.npy   an (N, D) array, opened memory-mapped (fp16 by default)
  {split}.json  encoder name and a checksum of its weights, image ids (row order), dtype,
                and how many rows are done

Rows are written in order and `done` is advanced only after they are flushed, so a
killed run resumes where it stopped and never trusts a half-written row.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoint
from .config import Config
from .data import Example, ImageFiles, load_split
from .encoder_engine import encoder_runner, weights_checksum
from .encoders import Encoder, EncoderTop, build_encoder
from .errors import StaleCache
from .files import write_atomic
from .inference import resolve_device


def _paths(cache: Path, split: str) -> tuple[Path, Path]:
    return cache / f"{split}.npy", cache / f"{split}.json"


def _write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj))


def extract(encoder: Encoder, examples: list[Example], cache: str | Path, split: str, *, batch_size: int = 64,
            num_workers: int = 2, dtype: str = "float16", device="cpu", engine: str = "auto") -> np.ndarray:
    """Cache `encoder`'s features of `examples`, run by `engine` (see captioner.encoder_engine)."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    arr_path, meta_path = _paths(cache, split)
    ids = [ex.image_id for ex in examples]
    meta = {"encoder": encoder.name, "weights": weights_checksum(encoder), "ids": ids, "dtype": dtype,
            "dim": encoder.width, "done": 0}
    if meta_path.is_file() and arr_path.is_file():
        old = json.loads(meta_path.read_text())
        if old.get("encoder") == meta["encoder"] and old.get("weights") not in (None, meta["weights"]):
            # Another model's features (a fine-tuned encoder's, or the pretrained one's): never overwritten.
            raise StaleCache(f"{arr_path} holds features of other weights of {encoder.name}: "
                             "set another data.feature_cache (or delete that folder)")
        if all(old.get(k) == meta[k] for k in ("encoder", "weights", "ids", "dtype", "dim")):
            meta["done"] = old["done"]
    if meta["done"] == 0:
        arr = np.lib.format.open_memmap(arr_path, mode="w+", dtype=dtype, shape=(len(ids), encoder.width))
        _write_json(meta_path, meta)
    else:
        arr = np.load(arr_path, mmap_mode="r+")
    start = meta["done"]
    if start < len(ids):
        loader = DataLoader(ImageFiles([ex.path for ex in examples[start:]], encoder.preprocess), batch_size=batch_size,
                            num_workers=num_workers)
        run = encoder_runner(encoder, engine, torch.device(device))
        with tqdm(total=len(ids), initial=start, desc=f"features {split}", unit="img") as bar:
            for pixels in loader:
                feats = run(pixels).float().cpu().numpy()
                arr[start:start + len(feats)] = feats
                arr.flush()
                start += len(feats)
                meta["done"] = start
                _write_json(meta_path, meta)
                bar.update(len(feats))
    return np.load(arr_path, mmap_mode="r")


def open_features(cache: str | Path, split: str, examples: list[Example], encoder: Encoder) -> np.ndarray:
    """The cached (N, D) features of a split, checked against the examples and the encoder (its
    weights too: a checkpoint with a fine-tuned encoder cannot read the pretrained one's cache)."""
    arr_path, meta_path = _paths(Path(cache), split)
    hint = "run: captioner extract-features --config <your config>"
    if not meta_path.is_file():
        raise StaleCache(f"no cached features for split {split!r} in {cache}; {hint}")
    meta = json.loads(meta_path.read_text())
    if meta["ids"] != [ex.image_id for ex in examples]:
        raise StaleCache(f"cached features in {cache} were made for other images; {hint}")
    if meta["encoder"] != encoder.name or meta.get("weights") != weights_checksum(encoder):
        raise StaleCache(f"cached features in {cache} were made by another encoder or other weights of it "
                         f"(this one: {encoder.name}); {hint}")
    if meta["done"] < len(meta["ids"]):
        raise StaleCache(f"feature extraction for {split!r} stopped at {meta['done']}/{len(meta['ids'])}; "
                         f"{hint} to resume")
    return np.load(arr_path, mmap_mode="r")


def build_start_encoder(cfg: Config, start: dict | None) -> Encoder:
    """The encoder a run starts from: the pretrained one, or the fine-tuned one the start checkpoint stores."""
    return build_encoder(cfg.model.encoder, cfg.model.pretrained, trainable=cfg.model.finetune_encoder,
                         regions=cfg.model.attention, state=(start or {}).get("encoder"))


def cached_part(cfg: Config, encoder: Encoder) -> tuple[Encoder, EncoderTop | None, Path]:
    """(what the feature cache holds, the trained top or None, where the cache is): the whole
    encoder's v in data.feature_cache, or with train.encoder_top_blocks the maps below the cut,
    in a subfolder named for the cut."""
    if not cfg.train.encoder_top_blocks:
        return encoder, None, Path(cfg.data.feature_cache)
    below, top = encoder.split(cfg.train.encoder_top_blocks)
    return below, top, Path(cfg.data.feature_cache) / below.name


def extract_all(cfg: Config, batch_size: int = 64, num_workers: int = 2, splits: list[str] | None = None) -> None:
    """Cache encoder features (or the maps below the cut) of the train and dev splits, or of `splits`
    (resumable), run by cfg.decode.engine."""
    cached, _, folder = cached_part(cfg, build_start_encoder(
        cfg, checkpoint.load(cfg.train.init_from) if cfg.train.init_from else None))
    device = resolve_device(cfg.train.device)
    for split in splits or (cfg.data.train_split, cfg.data.dev_split):
        extract(cached, load_split(cfg.data, split), folder, split, batch_size=batch_size,
                num_workers=num_workers, dtype=cfg.data.feature_dtype, device=device, engine=cfg.decode.engine)
