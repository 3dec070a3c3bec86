"""Crash-safe file writes: a reader (or a run after a crash) sees the old file or the whole new one.

Everything captioner writes whole (checkpoints, ONNX exports, feature-cache metadata,
evaluation reports, a compacted caption-dir output) goes through `atomic_path`: write a
temporary file beside the target, fsync it, rename it over the target, fsync the folder
so the rename itself survives a crash. Appended result rows are the one exception
(results_file.OutputFile, which fsyncs each append).

Also where captioner's own files are: the shipped model, and the per-user cache of exports.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _read_umask() -> int:
    # Read once, at import: setting the umask to read it is process-wide, unsafe once threads write files.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


UMASK = _read_umask()
DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "flickr8k_lite0.pt"


class UnsafeCache(PermissionError):
    """A cache folder someone else owns or may write to: what is in it could have been planted."""


def cache_dir(*parts: str) -> Path:
    """The cache folder `parts` below $CAPTIONER_CACHE, else $XDG_CACHE_HOME/captioner, else
    ~/.cache/captioner; each level is made 0700.

    The cache holds code that runs (ONNX graphs), trusted when it matches the JSON beside it, and
    whoever can write one can write both. So every level must be the user's own and writable by
    nobody else, or it is refused before anything inside is read or made (UnsafeCache)."""
    root = Path(os.environ.get("CAPTIONER_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captioner")
    root.parent.mkdir(parents=True, exist_ok=True)
    folder = root
    for part in ("", *parts):
        folder = folder / part if part else folder
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
        info = os.stat(folder)
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise UnsafeCache(errno.EACCES, "the cache folder is not yours alone (another owner, or group or others "
                              "may write to it); set CAPTIONER_CACHE to a folder only you can write", str(folder))
    return folder


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsync'd and renamed to `path`, on error removed.

    The new file keeps the mode of the file it replaces (a private 0600 file stays private), else
    gets the one any written file gets."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~UMASK
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, mode)  # mkstemp makes 0600
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def fsync_dir(folder: str | Path) -> None:
    """Make the folder's entries (a new or renamed file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256, read in blocks (ONNX graphs are tens of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
