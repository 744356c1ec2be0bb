"""Sources for `brics shard`: each lists its items in a fixed order and turns one item into a sample.

`folder` (any image folder, recursive) and `demo` (crops of the real photos scikit-image ships in
its wheel). Items are small picklable records; `process_*` functions run in worker processes and
return the files of one sample: the encoded image and a JSON record of where it came from.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from brics_cli.data.images import ImageSkip, center_crop_box, crop_resize, decode_rgb, encode, random_crop_box
from brics_cli.data.shards import ShardOptions
from brics_cli.registry import SOURCES


def _sample(img, options: ShardOptions, meta: dict[str, Any]) -> dict[str, bytes]:
    ext = "jpg" if options.format == "jpg" else options.format
    return {ext: encode(img, options.format, options.quality), "json": json.dumps(meta, sort_keys=True).encode()}


def split_items(items: Sequence[Any], val_count: int, seed: int) -> dict[str, list[Any]]:
    """A seeded choice of `val_count` items for val; both splits keep the source order."""
    val_count = min(max(val_count, 0), len(items))
    chosen = set(random.Random(seed).sample(range(len(items)), val_count))
    return {
        "train": [it for i, it in enumerate(items) if i not in chosen],
        "val": [it for i, it in enumerate(items) if i in chosen],
    }


@dataclass(frozen=True)
class FileItem:
    id: str  # path relative to the folder, POSIX separators
    path: str


@SOURCES.register("folder")
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
    img, info = decode_rgb(data)
    box = center_crop_box(*img.size)
    out = crop_resize(img, box, options.resolution, options.resize_filter, options.small)
    meta = {"source_id": item.id, "original_size": list(img.size), "crop_box": list(box), "filter": options.resize_filter}
    if info.get("converted"):
        meta["converted"] = info["converted"]
    return _sample(out, options, meta)


# Colour photos bundled in scikit-image's wheel (no download). The last two are held out for val.
DEMO_TRAIN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
DEMO_VAL_PHOTOS = ("retina", "stereo_motorcycle")


@dataclass(frozen=True)
class DemoItem:
    id: str
    photo: str


@functools.lru_cache(maxsize=None)
def demo_photo(name: str):
    from PIL import Image
    from skimage import data

    array = getattr(data, name)()
    if name == "stereo_motorcycle":
        array = array[0]  # (left, right, disparity)
    return Image.fromarray(array).convert("RGB")


@SOURCES.register("demo")
def list_demo(train_count: int, val_count: int) -> dict[str, list[DemoItem]]:
    def items(photos, n, split):
        return [DemoItem(f"{split}/{photos[i % len(photos)]}/{i:06d}", photos[i % len(photos)]) for i in range(n)]

    return {"train": items(DEMO_TRAIN_PHOTOS, train_count, "train"), "val": items(DEMO_VAL_PHOTOS, val_count, "val")}


def process_demo(item: DemoItem, options: ShardOptions, rng: random.Random) -> dict[str, bytes]:
    """A random square crop (1/4 to 1/2 of the photo's short side) resized to the resolution."""
    photo = demo_photo(item.photo)
    short = min(photo.size)
    size = rng.randint(max(short // 4, 1), max(short // 2, 1))
    box = random_crop_box(*photo.size, size, rng)
    out = crop_resize(photo, box, options.resolution, options.resize_filter, small="upscale")
    meta = {"source_id": item.id, "original_size": list(photo.size), "crop_box": list(box), "filter": options.resize_filter}
    return _sample(out, options, meta)
