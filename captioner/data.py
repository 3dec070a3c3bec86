"""Caption datasets: three on-disk formats, one interface.

Every loader returns a list of `Example` (one per image, with all its captions):
  - Flickr8k layout: Flickr8k.token.txt, Flickr_8k.{train,dev,test}Images.txt, Flicker8k_Dataset/
  - Karpathy split JSON (dataset_coco.json, dataset_flickr8k.json) + image folder
  - COCO captions JSON (captions_train2014.json style, read with pycocotools) + image folder
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .config import DataConfig
from .images import ImageError
from .vocab import Vocab


@dataclass
class Example:
    image_id: str | int  # file name (Flickr8k, Karpathy) or COCO's integer id
    path: Path
    captions: list[str] = field(default_factory=list)


FLICKR_SPLITS = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                 "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
KARPATHY_SPLITS = {"train": ("train", "restval"), "dev": ("val",), "val": ("val",), "test": ("test",),
                   "restval": ("restval",)}


def _lines(path: Path) -> list[str]:
    # splitlines() also takes the published CRLF line ends.
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def load_flickr8k(root: str | Path, split: str) -> list[Example]:
    root = Path(root)
    if split not in FLICKR_SPLITS:
        raise ValueError(f"unknown Flickr8k split {split!r}; choose from {sorted(FLICKR_SPLITS)}")
    split_file = root / FLICKR_SPLITS[split]
    if not split_file.is_file():
        raise FileNotFoundError(f"Flickr8k split file missing: {split_file} (split {split!r}). "
                                f"Expected the original layout in {root}.")
    token_file = root / "Flickr8k.token.txt"
    if not token_file.is_file():
        raise FileNotFoundError(f"Flickr8k captions missing: {token_file}")
    captions: dict[str, list[str]] = {}
    for line in _lines(token_file):
        key, _, text = line.partition("\t")
        captions.setdefault(key.rsplit("#", 1)[0], []).append(text.strip())
    images = root / "Flicker8k_Dataset"
    return [Example(name, images / name, captions.get(name, [])) for name in _lines(split_file)]


def load_karpathy(json_path: str | Path, images: str | Path, split: str) -> list[Example]:
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"unknown Karpathy split {split!r}; choose from {sorted(KARPATHY_SPLITS)}")
    wanted = KARPATHY_SPLITS[split]
    data = json.loads(Path(json_path).read_text())
    out = []
    for img in data["images"]:
        if img["split"] in wanted:
            rel = Path(img.get("filepath", "")) / img["filename"]
            out.append(Example(img["filename"], Path(images) / rel, [s["raw"].strip() for s in img["sentences"]]))
    return out


def load_coco(json_path: str | Path, images: str | Path) -> list[Example]:
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco = COCO(str(json_path))
    out = []
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        caps = [a["caption"].strip() for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id))]
        out.append(Example(img_id, Path(images) / info["file_name"], caps))
    return out


def load_split(cfg: DataConfig, split: str) -> list[Example]:
    """The examples of one split, whatever the format. COCO files hold one split each."""
    if cfg.format == "flickr8k":
        return load_flickr8k(cfg.root, split)
    if cfg.images is None:
        raise ValueError(f"data.images (the image folder) is required for format {cfg.format!r}")
    if cfg.format == "karpathy":
        return load_karpathy(_existing(cfg.root), cfg.images, split)
    if cfg.format == "coco":
        path = cfg.dev_annotations if split == cfg.dev_split and cfg.dev_annotations else cfg.root
        return load_coco(_existing(path), cfg.images)
    raise ValueError(f"unknown data format {cfg.format!r}; choose flickr8k, karpathy or coco")


def _existing(path) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    return Path(path)


class CaptionDataset(Dataset):
    """One item per (image, caption) pair: (image input, token ids).

    `source[i]` gives image i's input: a row of cached features, or a transformed image.
    """

    def __init__(self, examples: list[Example], vocab: Vocab, source, max_len: int = 30):
        self.source = source
        self.pairs = [(i, vocab.encode(c, max_len)) for i, ex in enumerate(examples) for c in ex.captions]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, idx):
        i, ids = self.pairs[idx]
        return image_input(self.source, i), torch.tensor(ids)


def image_input(source, i: int) -> torch.Tensor:
    """`source[i]` as a tensor: a row of cached features (fp16, read-only memmap), or a transformed image."""
    x = source[i]
    return torch.from_numpy(x.astype(np.float32)) if isinstance(x, np.ndarray) else x


class FileItem(NamedTuple):
    name: str
    pixels: torch.Tensor | None
    error: str | None  # why the file could not be read


class ImageFiles(Dataset):
    """Image files opened and preprocessed one per item (in DataLoader workers, when there are some).

    A file that cannot be read raises: training and feature caches need every image. With
    keep_errors=True it becomes FileItem(name, None, why) instead, for the caller to report
    (caption-dir, evaluate): one odd file never ends a batch run. Items are then FileItems,
    named by `names` (default: the paths as given).
    """

    def __init__(self, paths: list, preprocess: Callable[[Path], torch.Tensor], *, keep_errors: bool = False,
                 names: list[str] | None = None):
        self.paths, self.preprocess, self.keep_errors = list(paths), preprocess, keep_errors
        self.names = names or [str(p) for p in self.paths]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if not self.keep_errors:
            return self.preprocess(self.paths[i])
        try:
            return FileItem(self.names[i], self.preprocess(self.paths[i]), None)
        except ImageError as e:
            return FileItem(self.names[i], None, str(e))
        except Exception as e:  # a decoder bug on one odd file must not end the whole run
            return FileItem(self.names[i], None, f"cannot read image: {type(e).__name__}: {e}")


class LengthBatches(Sampler):
    """Batches of captions of similar length, so little compute goes to padding.

    Each epoch: shuffle, sort within pools of `pool` batches by length, cut into
    batches, shuffle the batch order. The order depends only on (seed, epoch), so a
    resumed run sees the same batches; under DDP every rank draws the same order and
    takes every world_size-th batch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pool: int = 50):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.rank, self.world_size, self.pool, self.epoch = rank, world_size, pool, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        size, chunk = self.batch_size, self.batch_size * self.pool
        batches = []
        for i in range(0, len(order), chunk):
            idx = sorted(order[i:i + chunk], key=self.lengths.__getitem__)
            batches += [idx[j:j + size] for j in range(0, len(idx), size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self):
        batches = self._batches()
        per_rank = len(batches) // self.world_size
        return iter(batches[self.rank: per_rank * self.world_size: self.world_size])

    def __len__(self) -> int:
        N, size, chunk = len(self.lengths), self.batch_size, self.batch_size * self.pool
        n = sum(-(-min(chunk, N - i) // size) for i in range(0, N, chunk))
        return n // self.world_size


def collate(batch):
    """Stack image inputs; pad token ids with 0 (<pad>). Returns (inputs, tokens_in, targets)."""
    inputs, seqs = zip(*batch)
    tokens = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=0)
    return torch.stack(inputs), tokens[:, :-1], tokens[:, 1:]
