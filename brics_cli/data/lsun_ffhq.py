"""LSUN and FFHQ sources for `brics shard lsun|ffhq` (REFERENCES section 7, "Datasets").

LSUN church_outdoor is an LMDB folder (data.mdb, lock.mdb): keys are 40-hex ids, iterated in sorted
cursor order; values are encoded images (WebP in practice, JPEG possible; PIL detects the format
from the bytes). The key list is read once in the parent; every worker process opens its own
read-only environment (lock=False, no map_size), because an LMDB environment must never be used
across fork. The official val set is a separate LMDB (`--val-lmdb`).

FFHQ is `images1024x1024/<id//1000*1000:05d>/<id:05d>.png` (70,000 PNGs), or a zip of that tree.
Images are indexed by the integer id in the file stem, sorted by id; the official split is ids
< 60,000 train, the last 10,000 val. A zip is opened per worker process, like the LMDB. Entries that
are not read but counted in the manifest (they go last in train, so they never shift a real sample):
- `unsafe_path`: a zip entry with an absolute path or a `..` component (a crafted archive);
- `bad_name`: a PNG whose stem is not a decimal number, so it has no FFHQ id.

Both take the centre crop of the short side and resize it like `folder` (`crop_resize`); the
command defaults follow the published pipelines: bicubic for LSUN (LDM churches), box for FFHQ
(StyleGAN2 FID parity at 256: 4.3 with box vs 5.3 with Lanczos).
"""

from __future__ import annotations

import os
import random
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

from brics_cli.data.images import ImageSkip, center_crop_box, crop_resize, decode_rgb
from brics_cli.data.shards import ShardOptions
from brics_cli.data.sources import _sample, split_items
from brics_cli.errors import ConfigError
from brics_cli.registry import SOURCES

FFHQ_TRAIN_IDS = 60_000  # official split: ids 0..59999 train, 60000..69999 val
FFHQ_SPLITS = ("official", "random")

_HANDLES: dict[tuple[str, int], Any] = {}  # (path, pid) -> open LMDB environment or zip file


def _per_process(path: str, opener: Callable[[str], Any]) -> Any:
    """`opener(path)`, opened once per process.

    Keyed by pid, so a forked worker never uses a handle its parent opened (an LMDB environment or
    a zip file offset shared across fork breaks). The listing functions `_forget` the path first.
    """
    key = (path, os.getpid())
    if key not in _HANDLES:
        _HANDLES[key] = opener(path)
    return _HANDLES[key]


def _forget(path: str) -> None:
    """Close this process's handle on `path`, before listing it. py-lmdb refuses to open an
    environment that is already open in the process -- and a forked worker inherits that record --
    so a run after a `--workers 1` run in the same process must close the cached one; a zip
    replaced at the same path must not be read through a stale handle."""
    handle = _HANDLES.pop((path, os.getpid()), None)
    if handle is not None:
        handle.close()


def _center_sample(data: bytes, source_id: str, options: ShardOptions) -> dict[str, bytes]:
    """Encoded image bytes -> one sample: centre crop of the short side, resized, + its JSON record."""
    img, info = decode_rgb(data)
    box = center_crop_box(*img.size)
    out = crop_resize(img, box, options.resolution, options.resize_filter, options.small)
    meta = {"source_id": source_id, "original_size": list(img.size), "crop_box": list(box), "filter": options.resize_filter}
    if info.get("converted"):
        meta["converted"] = info["converted"]
    return _sample(out, options, meta)


# ---- LSUN ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LmdbItem:
    id: str  # the LMDB key, decoded as ASCII (40 hex digits in LSUN)
    path: str  # the LMDB folder


def _open_lmdb(path: str):
    import lmdb

    # Read-only and lock=False: nothing writes, and no lock file has to be writable. max_readers=1:
    # each process runs one read transaction at a time. readahead=False: random access over a file
    # larger than RAM would otherwise evict pages it still needs.
    return lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=1)


@SOURCES.register("lsun")
def list_lsun(root: Path) -> list[LmdbItem]:
    """Every key of the LSUN LMDB folder `root`, in cursor (sorted byte) order."""
    import lmdb

    if not (root.is_dir() and (root / "data.mdb").is_file()):
        raise ConfigError(
            f"{root} is not an LSUN LMDB folder: expected a directory holding data.mdb and lock.mdb "
            f"(e.g. church_outdoor_train_lmdb, unpacked from its zip)"
        )
    path = str(root.resolve())
    _forget(path)
    try:
        env = _open_lmdb(path)
    except lmdb.Error as exc:
        raise ConfigError(f"cannot open {root} as an LMDB: {exc}") from exc
    try:  # opened and closed here, in the parent, before any worker forks
        with env.begin() as txn:
            keys = list(txn.cursor().iternext(keys=True, values=False))
    finally:
        env.close()
    items = []
    for key in keys:
        try:
            items.append(LmdbItem(key.decode("ascii"), path))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{root} is not an LSUN LMDB: key {key[:60]!r} is not ASCII") from exc
    if not items:
        raise ConfigError(f"the LMDB {root} holds no keys")
    return items


def process_lmdb(item: LmdbItem, options: ShardOptions, rng: random.Random) -> dict[str, bytes]:
    env = _per_process(item.path, _open_lmdb)
    with env.begin() as txn:
        data = txn.get(item.id.encode("ascii"))
    if data is None:
        raise ImageSkip("unreadable", f"key not in {item.path}")
    return _center_sample(data, item.id, options)


# ---- FFHQ ------------------------------------------------------------------------------------


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
    _forget(zip_path)
    with zipfile.ZipFile(zip_path) as zf:  # listed in the parent and closed before any worker forks
        names = [i.filename for i in zf.infolist() if not i.is_dir() and i.filename.lower().endswith(".png")]
    return [(name, zip_path, name) for name in sorted(names)]


@SOURCES.register("ffhq")
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
    zf = _per_process(item.path, zipfile.ZipFile)
    try:
        return zf.read(item.member)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # bad CRC, broken deflate stream, cut-off zip
        raise ImageSkip("corrupt", f"{item.member}: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise ImageSkip("unreadable", f"{item.member}: {exc}") from exc


def process_ffhq(item: FfhqItem, options: ShardOptions, rng: random.Random) -> dict[str, bytes]:
    return _center_sample(_read_png(item), item.id, options)
