"""caption-dir's results file (.jsonl or .csv): the rows it holds, crash-safe appends, an atomic
rewrite, and the lock that lets one run at a time write it.

Rows are appended in one write and fsync'd, so a killed run leaves whole rows and at most one torn
last row, which the next read cuts off. A file that does not look like a results file is never
touched. The lock is a POSIX record lock on `<out>.lock`, held by the run's own process only.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from .files import fsync_dir, write_atomic
from .output import csv_text, csv_text_value

CSV_COLUMNS = ["image", "caption", "score", "error", "tags"]  # tags: "noun:prob" pairs, space-separated
CSV_NUMBERS = {"score"}  # the other columns are text: csv_text keeps a spreadsheet from running them
# json.dumps writes every row starting with exactly this, which tells our torn lines from foreign data.
JSONL_ROW_START = b'{"image": '


class OutputError(ValueError):
    """The output file exists but is not a caption-dir result file (it is left untouched)."""


class OutputLocked(OutputError):
    """Another run is writing the same output."""


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


def _csv_cell(row: dict, column: str) -> str:
    value = row.get(column, "")
    if column == "tags" and isinstance(value, list):
        value = " ".join(f"{t['tag']}:{t['prob']}" for t in value)
    return value if column in CSV_NUMBERS else csv_text(value)


