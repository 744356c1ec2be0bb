"""Throughput of `brics shard folder` against a bare PIL loop over the same files, in one run.

Input: `--count` JPEGs (default 300) of `--size` (default 512x384) cut from the real photos that
scikit-image ships, written to a temporary folder. The bare loop does what sharding must do at
minimum -- decode, convert to RGB, centre crop, Lanczos resize to 256, PNG encode -- with nothing
else: no tar, no manifest, no checks. `brics shard folder` is then timed with 1 and 2 workers
(library call, same options).

    python benchmarks/shard.py --out benchmarks/out/shard.json
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import tempfile
import time
from pathlib import Path

from PIL import Image

from brics_cli.data.shards import ShardOptions, write_shards
from brics_cli.data.sources.base import split_items
from brics_cli.data.sources.demo import DEMO_TRAIN_PHOTOS, demo_photo
from brics_cli.data.sources.folder import list_folder, process_file

from common import emit  # benchmarks/common.py (scripts run as `python benchmarks/NAME.py`)


def make_inputs(folder: Path, count: int, size: tuple[int, int]) -> None:
    rng = random.Random(0)
    for i in range(count):
        photo = demo_photo(DEMO_TRAIN_PHOTOS[i % len(DEMO_TRAIN_PHOTOS)])
        w, h = photo.size
        cw, ch = rng.randint(w // 3, w // 2), rng.randint(h // 3, h // 2)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)


def bare_loop(files: list[Path], resolution: int) -> None:
    for path in files:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="PNG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 384))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        make_inputs(src, args.count, tuple(args.size))
        files = sorted(src.glob("*.jpg"))
        bare_loop(files[:10], args.resolution)  # warm-up
        start = time.perf_counter()
        bare_loop(files, args.resolution)
        bare = args.count / (time.perf_counter() - start)

        options = ShardOptions(resolution=args.resolution, shard_size=50)
        splits = split_items(list_folder(src), 0, 0)
        rates = {}
        for workers in (1, 2):
            out = Path(tmp) / f"out{workers}"
            start = time.perf_counter()
            write_shards(out, splits, process_file, options, {"type": "folder"}, workers=workers)
            rates[workers] = args.count / (time.perf_counter() - start)

    report = {
        "benchmark": "shard",
        "config": {"count": args.count, "input_size": list(args.size), "resolution": args.resolution, "format": "png"},
        "images_per_s": {"bare_pil_loop": bare, "brics_1_worker": rates[1], "brics_2_workers": rates[2]},
        "ratios": {
            "brics_1_worker_vs_bare": rates[1] / bare,
            "brics_2_workers_vs_bare": rates[2] / bare,
            "speedup_2_workers": rates[2] / rates[1],
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
