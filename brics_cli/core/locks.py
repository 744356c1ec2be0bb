"""One writer per output folder: an exclusive lock that names its holder.

Every command that writes a folder (a run folder, a shard `--out`, a sample `--out`, the code
cache) holds `FOLDER/.brics.lock` for as long as it writes. A second writer is refused at once with
one line naming the holder -- pid, host, command and since when -- read from
`FOLDER/.brics.lock.json`, which the holder writes after it has the lock.

The lock is `filelock.FileLock`: an advisory `flock` on POSIX, released by the kernel when the
holder exits for any reason (kill -9 included), so a dead process never blocks a rerun. If the
record names a process of this host that no longer runs, the new writer says it takes over from
it. On NFS, Linux maps `flock` to POSIX byte-range locks held by the server (NFSv4, or NFSv3 with
lockd): brics assumes such a mount; on a file system without working locks two writers are not
detected.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from brics_cli.core.files import atomic_write_json
from brics_cli.errors import BricsError

LOCK_NAME = ".brics.lock"
RECORD_NAME = ".brics.lock.json"


class FolderBusy(BricsError):
    """Another process writes this folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_record(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe_holder(record: dict[str, Any] | None) -> str:
    if not record:
        return "another process (no holder record)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
    return f"pid {record.get('pid')} on {record.get('host')} (`{record.get('command')}`, since {since})"


class FolderLock:
    """`with FolderLock(folder, "brics ae-train ..."):` -- raises FolderBusy when another process holds it."""

    def __init__(self, folder: Path, command: str | None = None) -> None:
        from filelock import FileLock

        self.folder = Path(folder)
        self.command = command or " ".join(["brics", *sys.argv[1:]])
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.folder / LOCK_NAME))
        self.took_over: dict[str, Any] | None = None

    def acquire(self) -> "FolderLock":
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            holder = describe_holder(_read_record(self.folder))
            raise FolderBusy(
                f"{self.folder} is being written by {holder}; wait for it to finish, stop it, or choose another folder"
            ) from None
        previous = _read_record(self.folder)
        host = socket.gethostname()
        if previous and previous.get("host") == host and previous.get("pid") != os.getpid() and not _alive(int(previous.get("pid", 0))):
            self.took_over = previous
            print(f"note: {self.folder}: taking over the lock of {describe_holder(previous)}, which is no longer running",
                  file=sys.stderr)
        atomic_write_json(self.folder / RECORD_NAME,
                          {"pid": os.getpid(), "host": host, "command": self.command, "since": round(time.time(), 3)})
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            (self.folder / RECORD_NAME).unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def folder_lock(folder: Path, rt=None, command: str | None = None) -> Iterator[FolderLock | None]:
    """The lock of `folder` for a job of one or several ranks (`rt`: a core.runtime.Runtime): rank 0
    holds it; if it cannot, every rank stops with rank 0's message instead of waiting at a barrier."""
    lock, error = None, None
    if rt is None or rt.is_main:
        try:
            lock = FolderLock(folder, command).acquire()
        except FolderBusy as exc:
            error = exc
    if rt is not None and rt.any_flag(error is not None) and error is None:
        raise FolderBusy(f"{folder}: rank 0 could not lock it (another process writes it)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
