"""The source protocol of `brics shard NAME`, and helpers the sources share.

A source is a `Source` subclass registered in `SOURCES` (entry-point group `brics.sources`; the
built-ins advertise theirs in brics' pyproject.toml exactly like a third-party distribution). It has:

- `help`: the command's description (one paragraph), shown by `brics shard --help` and `NAME --help`;
- `Options`: a dataclass of its own command-line options. Each field becomes a flag `--field-name`
  (or, with `argument(...)`, a positional argument), with its default (no default = required) and
  the `help` of its metadata; `option(..., before="resolution")` lists it before that common option
  in `--help` (default: before `--small`, i.e. after `--quality`);
- `defaults` / `helps`: other defaults and help texts for the common options (`resolution`,
  `resize_filter`, `format`, `quality`, `small`, `shard_size`, `workers`, `seed`, ...);
  `fixed`: common options the source sets itself, which then have no flag (demo: `small`);
- `plan(opts, options) -> Plan`: list the items (in the parent process, before any work): the
  train/val splits, the manifest's `source` record and the `extra` options recorded in the manifest;
- `process(item, options, rng) -> {ext: bytes}`: one item -> the files of one sample. It runs in
  worker processes, so it and the items must pickle: a module-level function or a staticmethod.
  Raise `ImageSkip(category, detail)` for an input that cannot become a sample; it is counted.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

from brics_cli.core.images import center_crop_box, crop_resize, decode_rgb, encode
from brics_cli.data.shards import ShardOptions


@dataclass
class Plan:
    """What `Source.plan` returns: everything `write_shards` needs besides the options."""

    splits: dict[str, list[Any]]  # "train" / "val" -> picklable items, in a fixed order
    source: dict[str, Any]  # the manifest's "source" record ("type" first, by convention)
    extra: dict[str, Any] = field(default_factory=dict)  # source options recorded in ShardOptions.extra


@dataclass
class NoOptions:
    """The `Options` of a source without options of its own."""


class Source:
    """Base class of `brics shard` sources; see the module docstring for the protocol."""

    help: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    defaults: ClassVar[Mapping[str, Any]] = {}
    helps: ClassVar[Mapping[str, str]] = {}
    fixed: ClassVar[Mapping[str, Any]] = {}

    def plan(self, opts: Any, options: ShardOptions) -> Plan:
        raise NotImplementedError

    @staticmethod
    def process(item: Any, options: ShardOptions, rng: random.Random) -> dict[str, bytes]:
        raise NotImplementedError


def option(default: Any = MISSING, *, help: str, before: str = "small") -> Any:
    """A field of `Source.Options` shown as `--name`; no default = a required option."""
    return field(default=default, metadata={"help": help, "before": before})


def argument(default: Any = MISSING, *, help: str) -> Any:
    """A field of `Source.Options` that is a positional argument (listed before every option)."""
    return field(default=default, metadata={"help": help, "argument": True})


# ---- helpers -----------------------------------------------------------------------------------


def sample_files(img, options: ShardOptions, meta: dict[str, Any]) -> dict[str, bytes]:
    """The files of one sample: the encoded image and its JSON record."""
    ext = "jpg" if options.format == "jpg" else options.format
    return {ext: encode(img, options.format, options.quality), "json": json.dumps(meta, sort_keys=True).encode()}


def center_crop_sample(data: bytes, source_id: str, options: ShardOptions) -> dict[str, bytes]:
    """Encoded image bytes -> one sample: centre crop of the short side, resized, + its JSON record."""
    img, info = decode_rgb(data)
    box = center_crop_box(*img.size)
    out = crop_resize(img, box, options.resolution, options.resize_filter, options.small)
    meta = {"source_id": source_id, "original_size": list(img.size), "crop_box": list(box), "filter": options.resize_filter}
    if info.get("converted"):
        meta["converted"] = info["converted"]
    return sample_files(out, options, meta)


def split_items(items: Sequence[Any], val_count: int, seed: int) -> dict[str, list[Any]]:
    """A seeded choice of `val_count` items for val; both splits keep the source order."""
    val_count = min(max(val_count, 0), len(items))
    chosen = set(random.Random(seed).sample(range(len(items)), val_count))
    return {
        "train": [it for i, it in enumerate(items) if i not in chosen],
        "val": [it for i, it in enumerate(items) if i in chosen],
    }


def held_out(val_count: int | None, val_fraction: float, n_items: int) -> int:
    """--val-count if given, else --val-fraction of the items."""
    return val_count if val_count is not None else int(round(val_fraction * n_items))


_HANDLES: dict[tuple[str, int], Any] = {}  # (path, pid) -> open LMDB environment or zip file


def per_process(path: str, opener: Callable[[str], Any]) -> Any:
    """`opener(path)`, opened once per process.

    Keyed by pid, so a forked worker never uses a handle its parent opened (an LMDB environment or
    a zip file offset shared across fork breaks). The listing functions `forget` the path first.
    """
    key = (path, os.getpid())
    if key not in _HANDLES:
        _HANDLES[key] = opener(path)
    return _HANDLES[key]


def forget(path: str) -> None:
    """Close this process's handle on `path`, before listing it. py-lmdb refuses to open an
    environment that is already open in the process -- and a forked worker inherits that record --
    so a run after a `--workers 1` run in the same process must close the cached one; a zip
    replaced at the same path must not be read through a stale handle."""
    handle = _HANDLES.pop((path, os.getpid()), None)
    if handle is not None:
        handle.close()
