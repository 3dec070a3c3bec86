"""Which files a machine captions: `--shard i/n`, or the scheduler's rank, and a hash of each path.

A file's shard is a hash of its relative path alone, so copies of a folder that differ between
machines still give shards that are disjoint and, together, complete.
"""
from __future__ import annotations

import hashlib
import os


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

