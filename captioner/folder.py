"""Captioning a folder: every image file gets exactly one output row, at the speed of the encoder.

Worker processes open and preprocess the images (the model's `preprocess`) while the
main process runs the batched encoder and beam search. A file that cannot be read
becomes an error row; it never stops the batch, not even when it kills the worker
reading it. Nothing here needs torch: on a CPU the model is the torch-free runtime.

The output (results_file.OutputFile, .jsonl or .csv) is appended and fsync'd once per
batch, so a run that is killed loses at most the batch in flight. A rerun with the same
output reads the rows already there, cuts away a torn last row, and captions only what is
missing (with retry_errors, the images whose row is an error too). An image's last row is
its answer: a retried image has two rows until the run ends and rewrites the file with one
row each, atomically. A lock beside the output (results_file.exclusive) keeps two runs from
writing one output at once; `shards` picks this machine's share of the files.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tqdm import tqdm

from .config import DecodeConfig
from .images import ImageError
from .results_file import OutputFile, exclusive
from .shards import shard
from .sidecars import Sidecars

if TYPE_CHECKING:  # either engine: the torch Captioner or the torch-free runtime.Runtime
    from .inference import Captioner
    from .runtime import Runtime

DEFAULT_EXTS = ("jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff")


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



class FileItem(NamedTuple):
    name: str
    pixels: Any  # the model's preprocessed input, None when the file could not be read
    error: str | None  # why the file could not be read


def read_file(preprocess: Callable, path: Path, name: str) -> FileItem:
    """One file, preprocessed; a file that cannot be read becomes FileItem(name, None, why), never an exception."""
    try:
        return FileItem(name, preprocess(path), None)
    except ImageError as e:
        return FileItem(name, None, str(e) or "cannot read image")
    except Exception as e:  # a decoder bug on one odd file must not end the whole run
        return FileItem(name, None, f"cannot read image: {type(e).__name__}: {e}")


_preprocess: Callable | None = None  # a reader process's preprocess, inherited when the pool forks


def _start_reader(preprocess: Callable, parent: int) -> None:
    global _preprocess
    _preprocess = preprocess
    # A reader must not outlive a run killed with kill -9: Linux kills it with its parent.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
    torch = sys.modules.get("torch")
    if torch is not None:  # a torch Captioner's preprocess: a forked OpenMP pool would hang, so one thread
        torch.set_num_threads(1)
    # The encoder's threads are the bottleneck and wait on each other at every parallel
    # region: a reader that preempts one of them stalls them all. At low priority the
    # readers run in the gaps instead (they need ~1 ms of CPU per photo).
    os.nice(10)


def _read_job(job: list[tuple[Path, str]]) -> list[FileItem]:
    return [read_file(_preprocess, path, name) for path, name in job]


class Readers:
    """Jobs (lists of files) read by `workers` forked processes, in order, at most two per worker ahead.

    A reader that dies on a file (a decoder crash, the OOM killer) breaks the pool: the
    jobs in flight are read again file by file in a fresh pool, and the file that
    kills its reader again becomes an error row."""

    def __init__(self, preprocess: Callable, workers: int):
        self.preprocess, self.workers = preprocess, workers
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, multiprocessing.get_context("fork"), initializer=_start_reader,
                                   initargs=(self.preprocess, os.getpid()))

    def __call__(self, jobs: list[list[tuple[Path, str]]]) -> Iterator[list[FileItem]]:
        todo, ahead = iter(jobs), deque()
        try:
            while True:
                while len(ahead) < 2 * self.workers and (job := next(todo, None)) is not None:
                    ahead.append((job, self.pool.submit(_read_job, job)))
                if not ahead:
                    return
                job, future = ahead.popleft()
                try:
                    items = future.result()
                except BrokenProcessPool:
                    self._renew()
                    items = [self._read_alone(path, name) for path, name in job]
                    ahead = deque((j, self.pool.submit(_read_job, j)) for j, _ in ahead)
                yield items
        finally:
            self.pool.shutdown(cancel_futures=True)

    def _renew(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        self.pool = self._new_pool()

    def _read_alone(self, path: Path, name: str) -> FileItem:
        try:
            return self.pool.submit(_read_job, [(path, name)]).result()[0]
        except BrokenProcessPool:
            self._renew()
            return FileItem(name, None, "cannot read image: the process reading it died (out of memory, or a "
                                        "decoder crash)")


class Summary(NamedTuple):
    total: int  # files in this shard
    skipped: int  # already in the output before this run (error rows too, unless retried)
    captioned: int
    errors: int
    retried: int = 0  # error rows from earlier runs that this run tried again


def caption_dir(captioner: Captioner | Runtime, root: str | Path, out: str | Path, *, recursive: bool = False,
                exts=DEFAULT_EXTS, batch_size: int = 32, workers: int = 2, shard_spec: tuple[int, int] = (0, 1),
                retry_errors: bool = False, wait: bool = False, progress: bool = True,
                options: DecodeConfig | None = None, sidecars: Sidecars | None = None) -> Summary:
    """Caption every image file under `root` into `out` (.jsonl or .csv), resuming what is there.

    Rows: {"image": relative path, "caption", "score", "tags"} or {"image", "error"}; with the caption and
    an "error" too where embedding it failed (sidecars.embed).
    retry_errors: images whose row is an error are tried again; the new row replaces it.
    wait: when another run is writing `out`, wait for it to end instead of raising OutputLocked.
    options: decoding settings (the model's `options(...)`; None: the model's own).
    sidecars: what to write besides the table (sidecars.Sidecars). Each new row's sidecars are written
    before the row is appended, and every row already there gets the sidecars it lacks, so a resumed
    run neither skips one nor, as the writes change nothing already written, writes one twice.
    """
    root = Path(root)
    output = OutputFile(out)
    output.path.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after the first batch
    files = shard(list_images(root, recursive=recursive, exts=exts), *shard_spec)
    with exclusive(output.path, wait):
        last = output.last_rows()
        retry = [f for f in files if retry_errors and f in last and last[f].get("error")]
        todo = [f for f in files if f not in last] + retry
        summary = dict(total=len(files), skipped=len(files) - len(todo), captioned=0, errors=0, retried=len(retry))
        if sidecars:
            sidecars.prepare(root, files)
            for name in sorted(set(files) - set(todo)):
                sidecars.write(root, last[name], done=True)
        if todo:
            _caption_files(captioner, root, sorted(todo), output, summary, batch_size=batch_size, workers=workers,
                           progress=progress, options=options, sidecars=sidecars)
        output.compact()
    return Summary(**summary)


def _caption_files(captioner: Captioner | Runtime, root: Path, names: list[str], output: OutputFile, summary: dict, *,
                   batch_size: int, workers: int, progress: bool, options: DecodeConfig | None,
                   sidecars: Sidecars | None) -> None:
    with tqdm(total=summary["total"], initial=summary["skipped"], unit="img", desc="caption-dir",
              disable=not progress, dynamic_ncols=True) as bar:
        for batch in caption_files(captioner, root, names, options, batch_size=batch_size, workers=workers):
            rows = [{"image": name, "error": error} if results is None else {"image": name, **results[0]}
                    for name, results, error in batch]
            if sidecars:
                rows = [sidecars.write(root, row) for row in rows]
            output.append(rows)
            n_err = sum(bool(row.get("error")) for row in rows)
            summary["errors"] += n_err
            summary["captioned"] += len(rows) - n_err
            bar.update(len(rows))
            bar.set_postfix(errors=summary["errors"])


Row = tuple[str, list[dict] | None, str | None]  # (name, formatted hypotheses or None, error or None)
READ_JOB = 8  # files a reader reads and hands over at once


def caption_files(captioner: Captioner | Runtime, root: Path, names: list[str], options: DecodeConfig | None = None,
                  *, batch_size: int = 32, workers: int = 2) -> Iterator[list[Row]]:
    """Per batch, each file's (name, formatted hypotheses or None, error or None), in order.

    Reader processes open and preprocess the files (an unreadable one becomes an error,
    never an exception) while this process encodes and decodes the readable ones.
    caption-dir and evaluate both caption through here.
    """
    batches = [names[i:i + batch_size] for i in range(0, len(names), batch_size)]
    # Jobs of a few files, none across two batches: the first batch waits for one job instead of for
    # one reader to read it all, and each job is encoded as it comes while the readers read on.
    jobs = [[(root / n, n) for n in b[j:j + READ_JOB]] for b in batches for j in range(0, len(b), READ_JOB)]
    if workers:
        read = Readers(captioner.preprocess, workers)(jobs)
    else:
        read = ([read_file(captioner.preprocess, path, name) for path, name in job] for job in jobs)
    sizes = iter(map(len, batches))
    size, items, feats = next(sizes, 0), [], []
    for job in read:
        ok = [it.pixels for it in job if it.pixels is not None]
        if ok:
            feats += list(captioner.encode(captioner.stack(ok)))  # rows, stacked again for the batch's search
        items += job
        if len(items) == size:
            found = iter(captioner.describe(captioner.stack(feats), options) if feats else [])
            yield [(it.name, None, it.error) if it.pixels is None else (it.name, next(found), None) for it in items]
            size, items, feats = next(sizes, 0), [], []
