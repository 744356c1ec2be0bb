"""`brics shard lsun LMDB`: an LSUN LMDB folder (e.g. church_outdoor; REFERENCES section 7, "Datasets").

LSUN church_outdoor is an LMDB folder (data.mdb, lock.mdb): keys are 40-hex ids, iterated in sorted
cursor order; values are encoded images (WebP in practice, JPEG possible; PIL detects the format
from the bytes). The key list is read once in the parent; every worker process opens its own
read-only environment (lock=False, no map_size), because an LMDB environment must never be used
across fork. The official val set is a separate LMDB (`--val-lmdb`).

Images take the centre crop of the short side, resized like `folder` (`crop_resize`); the default
filter is bicubic, as in LDM's churches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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


def list_lsun(root: Path) -> list[LmdbItem]:
    """Every key of the LSUN LMDB folder `root`, in cursor (sorted byte) order."""
    import lmdb

    if not (root.is_dir() and (root / "data.mdb").is_file()):
        raise ConfigError(
            f"{root} is not an LSUN LMDB folder: expected a directory holding data.mdb and lock.mdb "
            f"(e.g. church_outdoor_train_lmdb, unpacked from its zip)"
        )
    path = str(root.resolve())
    forget(path)
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
    env = per_process(item.path, _open_lmdb)
    with env.begin() as txn:
        data = txn.get(item.id.encode("ascii"))
    if data is None:
        raise ImageSkip("unreadable", f"key not in {item.path}")
    return center_crop_sample(data, item.id, options)


@dataclass
class LsunOptions:
    lmdb_dir: Path = argument(help="LSUN LMDB folder holding data.mdb (e.g. church_outdoor_train_lmdb).")
    val_lmdb: Optional[Path] = option(None, help="LSUN's val LMDB (e.g. church_outdoor_val_lmdb): all of it becomes val.")
    val_count: Optional[int] = option(None, help="Images of LMDB_DIR held out for val (default: --val-fraction).")
    val_fraction: float = option(0.02, help="Fraction held out for val when neither --val-count nor --val-lmdb is given.")
    max_images: Optional[int] = option(None, help="Use only the first N keys of LMDB_DIR (sorted).")


@SOURCES.register("lsun")
class LsunSource(Source):
    help = (
        "LSUN LMDB (e.g. church_outdoor) -> shards; each worker opens the LMDB read-only itself. Corrupt, empty and "
        "too-small values are skipped and counted."
    )
    Options = LsunOptions
    defaults = {"resize_filter": "bicubic"}
    helps = {"resize_filter": "lanczos | bicubic | box (antialiased); bicubic as LDM's churches."}
    process = staticmethod(process_lmdb)

    def plan(self, opts: LsunOptions, options: ShardOptions) -> Plan:
        if opts.val_lmdb is not None and opts.val_count:  # a usage error, before any file is opened
            raise ConfigError("--val-count and --val-lmdb exclude each other: with --val-lmdb, val is that whole LMDB")
        items = list_lsun(opts.lmdb_dir)[: opts.max_images or None]
        if opts.val_lmdb is not None:
            splits = {"train": items, "val": list_lsun(opts.val_lmdb)}
            n_val = len(splits["val"])
        else:
            n_val = held_out(opts.val_count, opts.val_fraction, len(items))
            splits = split_items(items, n_val, options.seed)
        source = {
            "type": "lsun",
            "path": str(opts.lmdb_dir.resolve()),
            "keys": len(items),
            "val_lmdb": str(opts.val_lmdb.resolve()) if opts.val_lmdb is not None else None,
            "split": "val-lmdb" if opts.val_lmdb is not None else "random",
        }
        return Plan(splits, source, {"val_count": n_val})
