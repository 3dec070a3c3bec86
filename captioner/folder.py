"""Captioning a folder: every image file gets exactly one output row, at the speed of the encoder.

Worker processes open and preprocess the images (the model's `preprocess`) while the
main process runs the batched encoder and beam search. A file that cannot be read
becomes an error row; it never stops the batch, not even when it kills the worker
reading it. Nothing here needs torch: on a CPU the model is the torch-free runtime.

The output (.jsonl or .csv) is appended and fsync'd once per batch, so a run that is
killed loses at most the batch in flight. A rerun with the same output reads the
rows already there, cuts away a torn last row, and captions only what is missing
(with retry_errors, the images whose row is an error too). An image's last row is
its answer: a retried image has two rows until the run ends and rewrites the file
with one row each, atomically (a temporary file renamed over it). A lock file
beside the output (`<out>.lock`) keeps two runs from writing one output at once.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tqdm import tqdm

from .config import DecodeConfig
from .files import fsync_dir, write_atomic
from .images import ImageError
from .output import csv_text, csv_text_value
from .sidecars import Sidecars

if TYPE_CHECKING:  # either engine: the torch Captioner or the torch-free runtime.Runtime
    from .inference import Captioner
    from .runtime import Runtime

DEFAULT_EXTS = ("jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff")
CSV_COLUMNS = ["image", "caption", "score", "error", "tags"]  # tags: "noun:prob" pairs, space-separated
CSV_NUMBERS = {"score"}  # the other columns are text: csv_text keeps a spreadsheet from running them
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


class OutputLocked(OutputError):
    """Another run is writing the same output."""


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' (0 <= i < n) -> (i, n)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/n, e.g. 0/4 (got {text!r})") from None
    if not 0 <= i < n:
        raise ValueError(f"shard i/n needs 0 <= i < n (got {text!r})")
    return i, n


def resolve_shard(text: str | None, environ=os.environ) -> tuple[int, int, str]:
    """(i, n, where it came from): `--shard i/n` when given, else the scheduler's environment,
    torchrun's RANK/WORLD_SIZE or a Slurm array's SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT,
    else 0/1 (everything)."""
    if text:
        return (*parse_shard(text), "--shard")
    source = "the environment"
    try:
        if "RANK" in environ and "WORLD_SIZE" in environ:
            source = "RANK/WORLD_SIZE"
            index, count = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        elif "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
            source = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
            # Array ids need not start at 0 or be consecutive (--array=1-8, --array=0-30:10).
            first, step = int(environ.get("SLURM_ARRAY_TASK_MIN", 0)), int(environ.get("SLURM_ARRAY_TASK_STEP", 1))
            index, count = (int(environ["SLURM_ARRAY_TASK_ID"]) - first) // step, int(environ["SLURM_ARRAY_TASK_COUNT"])
        else:
            return 0, 1, "no shard"
        return (*parse_shard(f"{index}/{count}"), source)
    except ValueError as e:
        raise ValueError(f"cannot take the shard from {source}: {e}") from None


def shard_of(name: str, count: int) -> int:
    """A file's shard from a hash of its relative path alone: the same on every machine
    and in every listing, whatever other files a machine's copy of the folder holds."""
    digest = hashlib.sha256(name.encode("utf-8", errors="surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


def shard(files: list[str], index: int, count: int) -> list[str]:
    """The files of shard `index` of `count`: n machines, disjoint and complete."""
    return [f for f in files if shard_of(f, count) == index]


# The lock files this process holds. A POSIX lock never conflicts with its own process, and closing any
# descriptor of the file in the holder drops it: the process checks here before it opens the file at all.
_HELD: set[str] = set()
_HELD_CHANGED = threading.Condition()


@contextlib.contextmanager
def exclusive(out: Path, wait: bool = False):
    """Hold an exclusive lock on `out` for the whole run, through `<out>.lock` beside it.

    A POSIX record lock (fcntl), not flock: it belongs to this process alone, so the reader
    processes it forks hold no share of it, and the kernel drops it the moment the process dies,
    also by kill -9 while its workers live on: a crashed run never blocks its own resume.
    The lock file stays after the run: deleting it would let a run that opened it just
    before lock a file that no longer exists, beside a newer run that locks a new one.
    """
    lock = out.with_name(out.name + ".lock")
    key = os.path.join(os.path.realpath(lock.parent), lock.name)
    with _HELD_CHANGED:
        if key in _HELD and not wait:
            raise OutputLocked(_locked_message(out, f"{os.getpid()} on {socket.gethostname()}"))
        _HELD_CHANGED.wait_for(lambda: key not in _HELD)
        _HELD.add(key)
    try:
        with _lock_file(lock, out, wait) as fd:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            yield
    finally:
        with _HELD_CHANGED:
            _HELD.discard(key)
            _HELD_CHANGED.notify_all()


@contextlib.contextmanager
def _lock_file(lock: Path, out: Path, wait: bool) -> Iterator[int]:
    try:  # never through a symlink: the lock file is written, and a link could point anywhere
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{lock} is a symbolic link; caption-dir writes its lock file only as a plain "
                              "file: remove the link") from None
        raise
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "unknown"
            if not wait:
                raise OutputLocked(_locked_message(out, holder)) from None
            print(f"caption-dir: waiting for the run writing {out} (pid {holder}) to end", file=sys.stderr)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock, as the process's death does


def _locked_message(out: Path, holder: str) -> str:
    return (f"{out} is being written by another caption-dir run (pid {holder}); "
            "wait for it to end (--wait waits) or choose another --out")


class OutputFile:
    """A results file, .jsonl or .csv: the rows it holds, crash-safe appends and an atomic rewrite."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".jsonl", ".csv"):
            raise ValueError(f"--out must end in .jsonl or .csv (got {self.path.name!r})")
        self.csv = suffix == ".csv"

    def rows(self) -> list[dict]:
        """Every row, in file order; a torn last row (a crash mid-write) is cut off the file first."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = self._complete_end(data)
        complete, tail = data[:end], data[end:]
        rows = self._parse(complete)
        if tail:
            if not self._torn_row(tail, header_done=bool(complete)):
                raise OutputError(f"{self.path} does not end like a caption-dir result file; "
                                  "not touching it (choose another --out)")
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        return rows

    def last_rows(self) -> dict[str, dict]:
        """Each image's last row (its answer), in the order the images first appear."""
        return _last_per_image(self.rows())

    def _complete_end(self, data: bytes) -> int:
        """Where the last whole row ends. A CSV row ends at a newline outside quotes: a quoted
        file name may hold newlines, and a torn row may stop inside its quotes."""
        if not self.csv:
            return data.rfind(b"\n") + 1
        end = pos = 0
        quoted = False
        for line in data.split(b"\n")[:-1]:  # the last piece has no newline after it
            pos += len(line) + 1
            quoted ^= line.count(b'"') % 2 == 1  # an escaped quote ("") counts twice
            if not quoted:
                end = pos
        return end

    def _parse(self, complete: bytes) -> list[dict]:
        text = complete.decode("utf-8", errors="surrogateescape")  # non-UTF-8 file names round-trip
        if self.csv:
            rows = list(csv.reader(io.StringIO(text, newline=""), strict=True)) if text else []
            if rows and rows[0] != CSV_COLUMNS:
                raise OutputError(f"{self.path} is not a caption-dir CSV (header {rows[0]} != {CSV_COLUMNS})")
            bad = next((n for n, r in enumerate(rows[1:], 2) if len(r) != len(CSV_COLUMNS)), None)
            if bad:
                raise OutputError(f"{self.path} row {bad}: expected {len(CSV_COLUMNS)} columns")
            return [{c: v if c in CSV_NUMBERS else csv_text_value(v) for c, v in zip(CSV_COLUMNS, r)}
                    for r in rows[1:]]
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or "image" not in row:
                raise OutputError(f"{self.path} line {n} is not a caption-dir row; not touching the file")
            rows.append(row)
        return rows

    def _torn_row(self, tail: bytes, header_done: bool) -> bool:
        if self.csv:
            header = (",".join(CSV_COLUMNS) + "\n").encode()
            return header_done or header.startswith(tail)
        return tail.startswith(JSONL_ROW_START) or JSONL_ROW_START.startswith(tail)

    def _encode(self, rows: list[dict], header: bool) -> bytes:
        buf = io.StringIO(newline="")
        if self.csv:
            writer = csv.writer(buf, lineterminator="\n")
            if header:
                writer.writerow(CSV_COLUMNS)
            writer.writerows([_csv_cell(r, c) for c in CSV_COLUMNS] for r in rows)
        else:
            # ASCII escapes keep every line valid UTF-8 JSON, even for non-UTF-8 file names.
            buf.writelines(json.dumps(r) + "\n" for r in rows)
        return buf.getvalue().encode("utf-8", errors="surrogateescape")

    def append(self, rows: list[dict]) -> None:
        """Append rows in one write, then fsync: after a crash the file holds whole rows and at most one torn row."""
        new = not self.path.exists() or self.path.stat().st_size == 0
        _append(self.path, self._encode(rows, header=new))
        if new:  # make the new file's directory entry durable too
            fsync_dir(self.path.parent)

    def compact(self) -> int:
        """Keep only each image's last row, where a retry left two; returns how many rows went.

        The rows go to a temporary file beside the output, which is then renamed over it:
        a crash leaves either the old file or the new one, whole.
        """
        rows = self.rows()
        last = _last_per_image(rows)
        if len(last) == len(rows):
            return 0
        # Through a symlinked output to its target, as the appends went: the link stays a link.
        write_atomic(os.path.realpath(self.path), self._encode(list(last.values()), header=self.csv))
        return len(rows) - len(last)


def _last_per_image(rows: list[dict]) -> dict[str, dict]:
    last = {}
    for row in rows:
        last[row["image"]] = row
    return last


def _append(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Batches of files read by `workers` forked processes, in order, at most two per worker ahead.

    A reader that dies on a file (a decoder crash, the OOM killer) breaks the pool: the
    batches in flight are read again file by file in a fresh pool, and the file that
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


def _csv_cell(row: dict, column: str) -> str:
    value = row.get(column, "")
    if column == "tags" and isinstance(value, list):
        value = " ".join(f"{t['tag']}:{t['prob']}" for t in value)
    return value if column in CSV_NUMBERS else csv_text(value)


Row = tuple[str, list[dict] | None, str | None]  # (name, formatted hypotheses or None, error or None)


def caption_files(captioner: Captioner | Runtime, root: Path, names: list[str], options: DecodeConfig | None = None,
                  *, batch_size: int = 32, workers: int = 2) -> Iterator[list[Row]]:
    """Per batch, each file's (name, formatted hypotheses or None, error or None), in order.

    Reader processes open and preprocess the files (an unreadable one becomes an error,
    never an exception) while this process encodes and decodes the readable ones.
    caption-dir and evaluate both caption through here.
    """
    jobs = [[(root / n, n) for n in names[i:i + batch_size]] for i in range(0, len(names), batch_size)]
    if workers:
        batches = Readers(captioner.preprocess, workers)(jobs)
    else:
        batches = ([read_file(captioner.preprocess, path, name) for path, name in job] for job in jobs)
    for items in batches:
        ok = [it.pixels for it in items if it.pixels is not None]
        found = iter(captioner.describe(captioner.encode(captioner.stack(ok)), options) if ok else [])
        yield [(it.name, None, it.error) if it.pixels is None else (it.name, next(found), None) for it in items]
