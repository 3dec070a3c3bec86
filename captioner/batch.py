"""Captioning a folder: every image file gets exactly one output row, at the speed of the encoder.

DataLoader worker processes open and preprocess the images (`Captioner.preprocess`)
while the main process runs the batched encoder and beam search. A file that cannot
be read becomes an error row; it never stops the batch.

The output (.jsonl or .csv) is appended and fsync'd once per batch, so a run that is
killed loses at most the batch in flight. A rerun with the same output reads the
rows already there, cuts away a torn last line, and captions only what is missing.
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .images import ImageError
from .inference import Captioner

DEFAULT_EXTS = ("jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff")
CSV_COLUMNS = ["image", "caption", "score", "error"]
# json.dumps writes every row starting with exactly this, which tells our torn lines from foreign data.
JSONL_ROW_START = b'{"image": '


class OutputError(ValueError):
    """The output file exists but is not a caption-dir result file (it is left untouched)."""


def list_images(root: str | Path, *, recursive: bool = False, exts=DEFAULT_EXTS) -> list[str]:
    """Image files under `root` as sorted relative POSIX paths.

    Symlinked folders are followed, but each real folder is read once, so a link
    loop ends and a folder reachable twice gives no duplicate rows.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    suffixes = {"." + e.lower().lstrip(".") for e in exts}
    seen, found = set(), []
    def unreadable(err: OSError):  # its files cannot be listed, so they cannot get rows: say so
        warnings.warn(f"caption-dir: skipping a folder it cannot read: {err}", stacklevel=2)

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        st = os.stat(dirpath)
        dirnames.sort()  # the walk order decides which of two links to one folder is listed
        if (st.st_dev, st.st_ino) in seen or not recursive:
            dirnames.clear()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames if os.path.splitext(f)[1].lower() in suffixes]
    return sorted(found)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' (0 <= i < n) -> (i, n)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/n, e.g. 0/4 (got {text!r})") from None
    if not 0 <= i < n:
        raise ValueError(f"shard i/n needs 0 <= i < n (got {text!r})")
    return i, n


def shard(files: list[str], index: int, count: int) -> list[str]:
    """Every count-th file of the sorted list, starting at index: n machines, disjoint and complete."""
    return files[index::count]


class OutputFile:
    """A results file, .jsonl or .csv: which images it already holds, and crash-safe appends."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".jsonl", ".csv"):
            raise ValueError(f"--out must end in .jsonl or .csv (got {self.path.name!r})")
        self.csv = suffix == ".csv"

    def done(self) -> set[str]:
        """The images with a row; a torn last line (a crash mid-write) is cut off the file first."""
        if not self.path.exists():
            return set()
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        complete, tail = data[:end], data[end:]
        names = self._parse(complete)
        if tail:
            if not self._torn_row(tail, header_done=bool(complete)):
                raise OutputError(f"{self.path} does not end like a caption-dir result file; "
                                  "not touching it (choose another --out)")
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        return names

    def _parse(self, complete: bytes) -> set[str]:
        text = complete.decode("utf-8", errors="surrogateescape")  # non-UTF-8 file names round-trip
        if self.csv:
            rows = list(csv.reader(io.StringIO(text, newline=""), strict=True)) if text else []
            if rows and rows[0] != CSV_COLUMNS:
                raise OutputError(f"{self.path} is not a caption-dir CSV (header {rows[0]} != {CSV_COLUMNS})")
            bad = next((n for n, r in enumerate(rows[1:], 2) if len(r) != len(CSV_COLUMNS)), None)
            if bad:
                raise OutputError(f"{self.path} line {bad}: expected {len(CSV_COLUMNS)} columns")
            return {r[0] for r in rows[1:]}
        names = set()
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                names.add(json.loads(line)["image"])
            except (ValueError, KeyError, TypeError):
                raise OutputError(f"{self.path} line {n} is not a caption-dir row; not touching the file") from None
        return names

    def _torn_row(self, tail: bytes, header_done: bool) -> bool:
        if self.csv:
            header = (",".join(CSV_COLUMNS) + "\n").encode()
            return header_done or header.startswith(tail)
        return tail.startswith(JSONL_ROW_START) or JSONL_ROW_START.startswith(tail)

    def append(self, rows: list[dict]) -> None:
        """Append rows in one write, then fsync: after a crash the file holds whole rows and at most one torn line."""
        new = not self.path.exists() or self.path.stat().st_size == 0
        buf = io.StringIO(newline="")
        if self.csv:
            writer = csv.writer(buf, lineterminator="\n")
            if new:
                writer.writerow(CSV_COLUMNS)
            writer.writerows([r.get(c, "") for c in CSV_COLUMNS] for r in rows)
        else:
            # ASCII escapes keep every line valid UTF-8 JSON, even for non-UTF-8 file names.
            buf.writelines(json.dumps(r) + "\n" for r in rows)
        data = buf.getvalue().encode("utf-8", errors="surrogateescape")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:  # make the new file's directory entry durable too
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


class FileItem(NamedTuple):
    name: str
    pixels: torch.Tensor | None
    error: str | None


class FileDataset(Dataset):
    """Runs in the DataLoader workers: open + preprocess one file, or describe why it failed."""

    def __init__(self, root: Path, names: list[str], preprocess):
        self.root, self.names, self.preprocess = root, names, preprocess

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i) -> FileItem:
        name = self.names[i]
        try:
            return FileItem(name, self.preprocess(self.root / name), None)
        except ImageError as e:
            return FileItem(name, None, str(e))
        except Exception as e:  # a decoder bug on one odd file must not end the whole run
            return FileItem(name, None, f"cannot read image: {type(e).__name__}: {e}")


def _background_worker(_worker_id: int) -> None:
    # The encoder's threads are the bottleneck and wait on each other at every parallel
    # region: a decode worker that preempts one of them stalls them all. At low priority
    # the workers run in the gaps instead (they need ~1 ms of CPU per photo).
    os.nice(10)


class FileBatch(NamedTuple):
    items: list[FileItem]
    pixels: torch.Tensor | None  # the readable items' tensors, stacked in item order


def collate_files(items: list[FileItem]) -> FileBatch:
    ok = [it.pixels for it in items if it.pixels is not None]
    return FileBatch(items, torch.stack(ok) if ok else None)


class Summary(NamedTuple):
    total: int  # files in this shard
    skipped: int  # already in the output before this run
    captioned: int
    errors: int


def caption_dir(captioner: Captioner, root: str | Path, out: str | Path, *, recursive: bool = False,
                exts=DEFAULT_EXTS, batch_size: int = 32, workers: int = 2, shard_spec: tuple[int, int] = (0, 1),
                progress: bool = True, **decode_options) -> Summary:
    """Caption every image file under `root` into `out` (.jsonl or .csv), resuming what is there.

    Rows: {"image": relative path, "caption", "score"} or {"image", "error"}.
    decode_options go to `Captioner.decode` (beam_size, max_len, length_penalty ...).
    """
    root = Path(root)
    output = OutputFile(out)
    output.path.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after the first batch
    files = shard(list_images(root, recursive=recursive, exts=exts), *shard_spec)
    done = output.done()
    todo = [f for f in files if f not in done]
    summary = dict(total=len(files), skipped=len(files) - len(todo), captioned=0, errors=0)
    if not todo:
        return Summary(**summary)
    loader = DataLoader(FileDataset(root, todo, captioner.preprocess), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_files, pin_memory=captioner.device.type == "cuda",
                        worker_init_fn=_background_worker)
    with tqdm(total=len(files), initial=summary["skipped"], unit="img", desc="caption-dir",
              disable=not progress, dynamic_ncols=True) as bar:
        for batch in loader:
            captions = iter([])
            if batch.pixels is not None:
                hyps = captioner.decode(captioner.encode(batch.pixels), **decode_options)
                captions = iter([captioner.format(h) for h in hyps])
            rows = [{"image": it.name, "error": it.error} if it.error else {"image": it.name, **next(captions)}
                    for it in batch.items]
            output.append(rows)
            n_err = sum(it.error is not None for it in batch.items)
            summary["errors"] += n_err
            summary["captioned"] += len(rows) - n_err
            bar.update(len(rows))
            bar.set_postfix(errors=summary["errors"])
    return Summary(**summary)
