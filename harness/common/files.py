"""Files that others read while they are written: whole-or-nothing replacement, and locks between processes."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def replacing(path: Path, *, keep: bool = False) -> Iterator[Path]:
    """A new temporary path beside `path` for the block to write (a file or a folder); flushed to disk and renamed
    over `path` when the block ends, so a reader sees the old `path` or the new one, never half of one. Removed when
    the block raises, or left for inspection with `keep`. A folder replaces only an absent or empty `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # created as any file is (umask)
    try:
        yield tmp
        if tmp.exists():
            fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if keep:
            raise
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` through `replacing`: readers see the old file or the new one. Returns `path`."""
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json_atomic(path: Path, obj: Any) -> Path:
    """`obj` as indented JSON (keys sorted, what JSON cannot hold as its str), written with `write_atomic`."""
    return write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def fsync(path: Path) -> None:
    """Flush a file's bytes (a folder's entries) to disk: without it a host crash can keep a rename and lose the bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def locked(path: Path, *, wait: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """An exclusive flock on `path` (created) held through the block, which it enters with True. When another process
    holds it: waits for it (first calling `on_wait`, to say so), or with wait=False enters at once with False,
    holding nothing. The kernel drops the lock when its holder dies, so a crashed holder never blocks anyone."""
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        yield True
