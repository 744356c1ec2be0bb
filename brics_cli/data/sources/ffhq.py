"""`brics shard ffhq PATH`: FFHQ, as its folder tree or a zip of it (REFERENCES section 7, "Datasets").

FFHQ is `images1024x1024/<id//1000*1000:05d>/<id:05d>.png` (70,000 PNGs), or a zip of that tree.
Images are indexed by the integer id in the file stem, sorted by id; the official split is ids
< 60,000 train, the last 10,000 val. A zip is opened per worker process. Entries that are not read
but counted in the manifest (they go last in train, so they never shift a real sample):
- `unsafe_path`: a zip entry with an absolute path or a `..` component (a crafted archive);
- `bad_name`: a PNG whose stem is not a decimal number, so it has no FFHQ id.

Images take the centre crop of the short side, resized like `folder` (`crop_resize`); the default
filter is box, for StyleGAN2 FID parity at 256 (4.3 with box vs 5.3 with Lanczos).
"""

from __future__ import annotations

import random
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

from brics_cli.core.images import ImageSkip
from brics_cli.data.shards import ShardOptions
from brics_cli.data.sources.base import (
    Plan,
    Source,
    argument,
    center_crop_sample,
    forget,
    held_out,
    option,
    per_process,
    split_items,
)
from brics_cli.errors import ConfigError
from brics_cli.registry import SOURCES

FFHQ_TRAIN_IDS = 60_000  # official split: ids 0..59999 train, 60000..69999 val
FFHQ_SPLITS = ("official", "random")


@dataclass(frozen=True)
class FfhqItem:
    id: str  # f"{id:05d}" for an image; the file or entry name for a skipped one
    path: str  # the PNG file, or the zip
    member: str = ""  # the entry inside the zip; "" for a file in a folder
    skip: str = ""  # "unsafe_path" | "bad_name": counted in the manifest, never read


def _ffhq_id(name: str) -> int | None:
    """The integer id in the stem of `name`, or None. isascii: int() would also take '٣', ' 3', '+3', '1_0'."""
    stem = PurePosixPath(name).stem
    return int(stem) if stem.isascii() and stem.isdigit() else None


def _unsafe(name: str) -> bool:
    """A zip entry name that is absolute ('/x', '\\x', 'C:x') or climbs out ('..')."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts


def _ffhq_entries(path: Path) -> list[tuple[str, str, str]]:
    """(name shown, path, zip member) of every PNG in the folder or zip `path`, and unsafe zip entries."""
    if path.is_dir():
        root = path / "images1024x1024" if (path / "images1024x1024").is_dir() else path
        return [
            (p.relative_to(root).as_posix(), str(p.resolve()), "")
            for p in sorted(root.rglob("*.png"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ]
    if not path.exists():
        raise ConfigError(f"FFHQ not found: {path} (expected images1024x1024/, its parent, or a zip of it)")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{path} is neither a folder nor a zip: expected images1024x1024/, its parent, or a zip of it")
    zip_path = str(path.resolve())
    forget(zip_path)
    with zipfile.ZipFile(zip_path) as zf:  # listed in the parent and closed before any worker forks
        names = [i.filename for i in zf.infolist() if not i.is_dir() and i.filename.lower().endswith(".png")]
    return [(name, zip_path, name) for name in sorted(names)]


def list_ffhq(path: Path) -> list[FfhqItem]:
    """Every FFHQ PNG sorted by integer id, then the entries to count as skipped (sorted by name)."""
    images: dict[int, FfhqItem] = {}
    skipped = []
    for name, file, member in _ffhq_entries(path):
        n = _ffhq_id(name)
        if member and _unsafe(member):
            skipped.append(FfhqItem(name, file, member, "unsafe_path"))
        elif n is None:
            skipped.append(FfhqItem(name, file, member, "bad_name"))
        elif n in images:
            first = images[n].member or images[n].path
            raise ConfigError(f"two FFHQ images have id {n}: {first} and {member or file}; keep one tree per input")
        else:
            images[n] = FfhqItem(f"{n:05d}", file, member)
    if not images:
        raise ConfigError(f"no FFHQ PNGs (<id>.png, e.g. 00000/00000.png) under {path}")
    return [images[n] for n in sorted(images)] + skipped


def ffhq_splits(items: Sequence[FfhqItem], split: str, val_count: int, seed: int) -> dict[str, list[FfhqItem]]:
    """official: ids < 60000 train, the rest val; random: `split_items`. Skipped entries go last in train."""
    images = [it for it in items if not it.skip]
    if split == "official":
        splits = {
            "train": [it for it in images if int(it.id) < FFHQ_TRAIN_IDS],
            "val": [it for it in images if int(it.id) >= FFHQ_TRAIN_IDS],
        }
    else:
        splits = split_items(images, val_count, seed)
    splits["train"] += [it for it in items if it.skip]
    return splits


def _read_png(item: FfhqItem) -> bytes:
    if item.skip == "unsafe_path":
        raise ImageSkip("unsafe_path", "absolute or '..' zip entry, not read")
    if item.skip:
        raise ImageSkip(item.skip, "file stem is not a decimal FFHQ id")
    if not item.member:
        try:
            return Path(item.path).read_bytes()
        except OSError as exc:
            raise ImageSkip("unreadable", str(exc)) from exc
    zf = per_process(item.path, zipfile.ZipFile)
    try:
        return zf.read(item.member)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # bad CRC, broken deflate stream, cut-off zip
        raise ImageSkip("corrupt", f"{item.member}: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise ImageSkip("unreadable", f"{item.member}: {exc}") from exc


def process_ffhq(item: FfhqItem, options: ShardOptions, rng: random.Random) -> dict[str, bytes]:
    return center_crop_sample(_read_png(item), item.id, options)


@dataclass
class FfhqOptions:
    path: Path = argument(help="FFHQ images1024x1024/ folder, its parent, or a zip of the tree.")
    split: str = option("official", help="official (ids < 60000 train, the rest val) | random (--val-count/--val-fraction).")
    val_count: Optional[int] = option(None, help="With --split random: images held out for val (default: --val-fraction).")
    val_fraction: float = option(0.02, help="With --split random: fraction held out when --val-count is not given.")
    max_images: Optional[int] = option(None, help="Use only the N smallest ids.")


@SOURCES.register("ffhq")
class FfhqSource(Source):
    help = (
        "FFHQ (folder tree or zip) -> shards, indexed by the integer id of each <id>.png. Zip entries with absolute or '..' "
        "paths (unsafe_path) and PNGs without a numeric name (bad_name) are counted, never read."
    )
    Options = FfhqOptions
    defaults = {"resize_filter": "box"}
    helps = {"resize_filter": "lanczos | bicubic | box (antialiased); box for StyleGAN2 FID parity."}
    process = staticmethod(process_ffhq)

    def plan(self, opts: FfhqOptions, options: ShardOptions) -> Plan:
        if opts.split not in FFHQ_SPLITS:
            raise ConfigError(f"--split must be official or random, got '{opts.split}'")
        if opts.val_count is not None and opts.split == "official":
            raise ConfigError("--val-count needs --split random: the official split is fixed (ids >= 60000 are val)")
        items = list_ffhq(opts.path)
        images = [it for it in items if not it.skip][: opts.max_images or None]
        n_val = held_out(opts.val_count, opts.val_fraction, len(images)) if opts.split == "random" else 0
        extra = {"split": opts.split, "val_count": n_val} if opts.split == "random" else {"split": opts.split}
        splits = ffhq_splits(images + [it for it in items if it.skip], opts.split, n_val, options.seed)
        source = {
            "type": "ffhq",
            "path": str(opts.path.resolve()),
            "container": "folder" if opts.path.is_dir() else "zip",
            "images": len(images),
            "split": opts.split,
        }
        return Plan(splits, source, extra)
