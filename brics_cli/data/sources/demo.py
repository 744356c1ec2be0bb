"""`brics shard demo`: random crops of the real photos scikit-image ships in its wheel (no download).

Six photos feed train and two held-out photos feed val; each sample is a random square crop (1/4 to
1/2 of the photo's short side) resized (upscaled if need be) to the resolution.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from brics_cli.core.images import crop_resize, random_crop_box
from brics_cli.data.shards import ShardOptions
from brics_cli.data.sources.base import Plan, Source, option, sample_files
from brics_cli.registry import SOURCES

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
    return sample_files(out, options, meta)


@dataclass
class DemoOptions:
    train_count: int = option(2048, help="Random crops of the 6 training photos.", before="resize_filter")
    val_count: int = option(256, help="Random crops of the 2 held-out photos.", before="resize_filter")


@SOURCES.register("demo")
class DemoSource(Source):
    help = "Real photos bundled with scikit-image -> random crops at the demo resolution; val crops come from held-out photos."
    Options = DemoOptions
    defaults = {"resolution": 64, "shard_size": 256}
    helps = {"resolution": "Output side in pixels."}
    fixed = {"small": "upscale"}
    process = staticmethod(process_demo)

    def plan(self, opts: DemoOptions, options: ShardOptions) -> Plan:
        source = {"type": "demo", "train_photos": list(DEMO_TRAIN_PHOTOS), "val_photos": list(DEMO_VAL_PHOTOS)}
        extra = {"train_count": opts.train_count, "val_count": opts.val_count}
        return Plan(list_demo(opts.train_count, opts.val_count), source, extra)
