"""`brics shard folder DIR`: any image folder, searched recursively, centre-cropped and resized.

Items are the non-hidden entries that are not directories, sorted by relative path; files that are
not images (or are corrupt, truncated, empty or too small) are skipped and counted in the manifest,
and so are entries that are no regular file: `not_regular` (a FIFO, socket or device -- never
opened for reading, so a FIFO cannot hang the run), `broken_link` (a symlink to nothing) and
`link_loop` (a symlink that leads back to itself). A symlink to a regular file is followed.
"""

from __future__ import annotations

import errno
import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from brics_cli.core.images import ImageSkip
from brics_cli.data.shards import ShardOptions
from brics_cli.data.sources.base import Plan, Source, argument, center_crop_sample, held_out, option, split_items
from brics_cli.errors import ConfigError
from brics_cli.registry import SOURCES


@dataclass(frozen=True)
class FileItem:
    id: str  # path relative to the folder, POSIX separators
    path: str


def list_folder(root: Path) -> list[FileItem]:
    """Every non-hidden entry under `root` that is not a directory, sorted by relative path (what is
    no image, or no regular file, is counted when processed)."""
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():  # is_dir: False for a broken link or a loop
            continue
        files.append(FileItem(rel.as_posix(), str(path)))
    return files


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(path: str) -> bytes:
    """The bytes of a regular file (through symlinks); anything else raises ImageSkip before a read can block."""
    try:
        mode = os.stat(path).st_mode  # follows links, opens nothing
        if not stat.S_ISREG(mode):
            raise ImageSkip("not_regular", f"{_kind(mode)}, not a regular file")
        # O_NONBLOCK: should the path have become a FIFO since the stat, open returns at once instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageSkip("link_loop", "symlink loop (too many levels of symbolic links)") from exc
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise ImageSkip("broken_link", f"symlink to {os.readlink(path)}, which does not exist") from exc
        raise ImageSkip("unreadable", str(exc)) from exc
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ImageSkip("not_regular", f"{_kind(mode)}, not a regular file")
        try:
            return f.read()
        except OSError as exc:
            raise ImageSkip("unreadable", str(exc)) from exc


def process_file(item: FileItem, options: ShardOptions, rng: random.Random) -> dict[str, bytes]:
    return center_crop_sample(read_regular_file(item.path), item.id, options)


@dataclass
class FolderOptions:
    root: Path = argument(help="Folder of images (searched recursively).")
    val_count: Optional[int] = option(None, help="Images held out for val (default: --val-fraction).")
    val_fraction: float = option(0.02, help="Fraction held out for val when --val-count is not given.")
    max_images: Optional[int] = option(None, help="Use only the first N files (sorted by path).")


@SOURCES.register("folder")
class FolderSource(Source):
    help = (
        "Any image folder -> shards. Corrupt, truncated, empty, non-image and too-small files, FIFOs, devices, broken "
        "symlinks and symlink loops are skipped and counted; CMYK, 16-bit, grayscale, palette and alpha images are "
        "converted to RGB."
    )
    Options = FolderOptions
    process = staticmethod(process_file)

    def plan(self, opts: FolderOptions, options: ShardOptions) -> Plan:
        if not opts.root.is_dir():
            raise ConfigError(f"folder not found: {opts.root}")
        items = list_folder(opts.root)[: opts.max_images or None]
        if not items:
            raise ConfigError(f"no files under {opts.root}")
        n_val = held_out(opts.val_count, opts.val_fraction, len(items))
        source = {"type": "folder", "path": str(opts.root.resolve()), "files": len(items)}
        return Plan(split_items(items, n_val, options.seed), source, {"val_count": n_val})
