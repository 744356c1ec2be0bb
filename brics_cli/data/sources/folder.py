"""`brics shard folder DIR`: any image folder, searched recursively, centre-cropped and resized.

Items are the regular, non-hidden files sorted by relative path; files that are not images (or are
corrupt, truncated, empty or too small) are skipped and counted in the manifest.
"""

from __future__ import annotations

import random
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
    """Every regular, non-hidden file under `root`, sorted by relative path (non-images are counted)."""
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        files.append(FileItem(rel.as_posix(), str(path)))
    return files


def process_file(item: FileItem, options: ShardOptions, rng: random.Random) -> dict[str, bytes]:
    try:
        data = Path(item.path).read_bytes()
    except OSError as exc:
        raise ImageSkip("unreadable", str(exc)) from exc
    return center_crop_sample(data, item.id, options)


@dataclass
class FolderOptions:
    root: Path = argument(help="Folder of images (searched recursively).")
    val_count: Optional[int] = option(None, help="Images held out for val (default: --val-fraction).")
    val_fraction: float = option(0.02, help="Fraction held out for val when --val-count is not given.")
    max_images: Optional[int] = option(None, help="Use only the first N files (sorted by path).")


@SOURCES.register("folder")
class FolderSource(Source):
    help = (
        "Any image folder -> shards. Corrupt, truncated, empty, non-image and too-small files are skipped and counted; "
        "CMYK, 16-bit, grayscale, palette and alpha images are converted to RGB."
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
