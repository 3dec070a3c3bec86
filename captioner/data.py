"""Caption datasets: five on-disk formats, one interface.

Every loader returns a list of `Example` (one per image, with all its captions):
  - Flickr8k layout: Flickr8k.token.txt, Flickr_8k.{train,dev,test}Images.txt, Flicker8k_Dataset/
  - Karpathy split JSON (dataset_coco.json, dataset_flickr8k.json) + image folder
  - COCO captions JSON (captions_train2014.json style, read with pycocotools) + image folder
  - CSV with a header and columns image,caption (one row per caption) + image folder
  - JSONL, one {"image", "caption"} or {"image", "captions": [...]} object a line + image folder
COCO, CSV and JSONL files hold one split each; image paths in them are relative to the image folder.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .config import DataConfig
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


class DataError(ValueError):
    """A caption file that cannot be read as its format; the message names the file and line."""


def _grouped(rows) -> list[Example]:
    """(image path, caption) pairs -> one Example per image, in order of first appearance."""
    by_image: dict[str, Example] = {}
    for image, path, caption in rows:
        by_image.setdefault(image, Example(image, path)).captions.append(caption)
    return list(by_image.values())


def _text(value, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {what} must be non-empty text, got {json.dumps(value)[:80]}")
    return value.strip()


def load_csv(path: str | Path, images: str | Path) -> list[Example]:
    """A CSV file with a header naming (at least) the columns image and caption."""
    path = Path(path)

    def rows():
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often write a BOM
            reader = csv.DictReader(f)
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}, line 1: the header must name the columns image and caption "
                                f"(missing {', '.join(sorted(missing))}; found {reader.fieldnames})")
            for row in reader:
                where = f"{path}, line {reader.line_num}"
                if None in row or None in row.values():  # more or fewer fields than the header
                    raise DataError(f"{where}: expected {len(reader.fieldnames)} fields as in the header")
                image = _text(row["image"], "image", where)
                yield image, Path(images) / image, _text(row["caption"], "caption", where)

    return _grouped(rows())


def load_jsonl(path: str | Path, images: str | Path) -> list[Example]:
    """JSON Lines: {"image": ..., "caption": "..."} or {"image": ..., "captions": ["...", ...]} a line."""
    path = Path(path)

    def rows():
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}, line {n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not JSON ({e})") from None
                if not isinstance(obj, dict) or "image" not in obj or ("caption" in obj) == ("captions" in obj):
                    raise DataError(f'{where}: expected {{"image": ..., "caption": "..."}} or '
                                    f'{{"image": ..., "captions": [...]}}, got {line.strip()[:80]}')
                image = _text(obj["image"], "image", where)
                captions = obj["captions"] if "captions" in obj else [obj["caption"]]
                if not isinstance(captions, list) or not captions:
                    raise DataError(f"{where}: captions must be a non-empty list of text")
                for c in captions:
                    yield image, Path(images) / image, _text(c, "caption", where)

    return _grouped(rows())


FORMATS = ("flickr8k", "karpathy", "coco", "csv", "jsonl")
ONE_SPLIT_FORMATS = {"coco": load_coco, "csv": load_csv, "jsonl": load_jsonl}  # a file is one split


def detect_format(data: str | Path) -> str:
    """flickr8k (a folder), csv, jsonl, karpathy or coco (a JSON file), from the path and what it holds."""
    data = Path(data)
    if data.is_dir():
        return "flickr8k"
    if not data.is_file():
        raise FileNotFoundError(f"no such dataset: {data} (give a Flickr8k folder, a Karpathy or COCO JSON, "
                                "a CSV or a JSONL file)")
    if data.suffix.lower() == ".csv":
        return "csv"
    if data.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    text = data.read_text(encoding="utf-8", errors="replace")
    try:
        content = json.loads(text)
    except json.JSONDecodeError as e:
        first = text.lstrip().splitlines()[0] if text.strip() else ""
        if first.startswith("{"):  # one object a line
            return "jsonl"
        if "image" in first and "caption" in first:  # a CSV header under another name
            return "csv"
        raise ValueError(f"{data} is not a JSON file ({e}); give a Flickr8k folder, a Karpathy or COCO JSON, "
                         "a CSV or a JSONL file") from None
    if isinstance(content, dict) and "annotations" in content:
        return "coco"
    if isinstance(content, dict) and any("sentences" in img for img in content.get("images", [])):
        return "karpathy"
    if isinstance(content, dict) and "image" in content:  # a JSONL file of one line
        return "jsonl"
    raise ValueError(f"{data} is neither a COCO captions file (no 'annotations') nor a Karpathy split "
                     "file (no 'images' with 'sentences')")


def load_split(cfg: DataConfig, split: str) -> list[Example]:
    """The examples of one split, whatever the format. COCO, CSV and JSONL files hold one split each."""
    if cfg.format == "flickr8k":
        return load_flickr8k(cfg.root, split)
    if cfg.images is None:
        raise ValueError(f"data.images (the image folder) is required for format {cfg.format!r}")
    if cfg.format == "karpathy":
        return load_karpathy(_existing(cfg.root), cfg.images, split)
    if cfg.format in ONE_SPLIT_FORMATS:
        path = cfg.dev_annotations if split == cfg.dev_split and cfg.dev_annotations else cfg.root
        return ONE_SPLIT_FORMATS[cfg.format](_existing(path), cfg.images)
    raise ValueError(f"unknown data format {cfg.format!r}; choose from {', '.join(FORMATS)}")


def _existing(path) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    return Path(path)


def with_replay(examples: list[Example], source, replay_examples: list[Example], replay_source, share: float,
                seed: int = 0) -> tuple[list[Example], np.ndarray]:
    """`examples` plus captions drawn at random (by seed) from `replay_examples`, so many that they
    make up `share` of all captions; with one feature array holding the rows of both."""
    if not 0 <= share < 1:
        raise ValueError(f"replay share must be in [0, 1), got {share}")
    pairs = [(i, c) for i, ex in enumerate(replay_examples) for c in ex.captions]
    want = min(len(pairs), round(share / (1 - share) * sum(len(ex.captions) for ex in examples)))
    chosen: dict[int, list[str]] = {}
    for k in sorted(torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:want].tolist()):
        i, caption = pairs[k]
        chosen.setdefault(i, []).append(caption)
    rows = sorted(chosen)
    extra = [Example(replay_examples[i].image_id, replay_examples[i].path, chosen[i]) for i in rows]
    return examples + extra, np.concatenate([np.asarray(source), np.asarray(replay_source[rows])])


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


class ImageFiles(Dataset):
    """Image files opened and preprocessed one per item (in DataLoader workers, when there are some).
    A file that cannot be read raises: training and feature caches need every image."""

    def __init__(self, paths: list, preprocess: Callable[[Path], torch.Tensor]):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.preprocess(self.paths[i])


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
