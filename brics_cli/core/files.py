"""Files written so that a crash, a kill or a full disk never leaves a half-written one behind.

`atomic_write_bytes` writes to a hidden temporary name in the same folder (`.NAME.tmpPID`), fsyncs
it, renames it over NAME and fsyncs the folder: NAME is always either its old or its new content.
A process killed mid-write leaves only its temporary file, which `remove_stale_temporaries` (run
by the next writer of the same folder) deletes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX: the directory entry lives in the folder)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """The temporary file `atomic_write_bytes` uses for `path`: hidden, and unique per process."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """`with atomic_open(path) as f: f.write(...)`: `path` appears, whole, only when the block ends
    without an error (the temporary is fsynced, renamed over `path`, the folder fsynced); on any error
    the temporary is removed and `path` keeps its old content. For writers that stream (an .npz of 50k
    images) as well as for `atomic_write_bytes`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # disk full, quota, read-only...: name the file meant, not the temporary
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either the old or the new content, never partial."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# What killed writers leave: brics' own `.NAME.tmpPID` (`temporary_name`), and safetensors'
# `.tmpXXXXXX` -- its Rust writer (0.5 and later) writes through a tempfile of its own in the
# target's folder and renames it onto the name it was given, so a kill inside `save_file` leaves one.
STALE_TEMPORARIES = (".*.tmp*", ".tmp??????")


def remove_stale_temporaries(folder: Path, patterns: tuple[str, ...] | str = STALE_TEMPORARIES) -> int:
    """Delete the temporary files killed writers left in `folder`; returns how many.

    Only for folders brics alone writes (run folders, caches, shard and sample folders), and only
    while it holds the folder's lock or before any rank writes: a live writer's temporary matches too.
    """
    if not Path(folder).is_dir():
        return 0
    removed = 0
    for pattern in (patterns,) if isinstance(patterns, str) else patterns:
        for stale in Path(folder).glob(pattern):
            if stale.is_file():
                stale.unlink(missing_ok=True)
                removed += 1
    return removed


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
