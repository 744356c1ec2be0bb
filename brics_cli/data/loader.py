"""The training data loader: WebDataset shards -> batches of float images in [-1, 1].

    shard list -> split by rank (node) -> split by DataLoader worker -> tar -> samples
    -> shuffle buffer -> decode + optional horizontal flip -> (image (3, H, W), key)

`data.shards` is a folder written by `brics shard` (its manifest.json lists the shards of each
split) or a brace-expanded WebDataset URL (`pipe:`, http(s), object storage) for clusters that
stream shards. Corrupt samples are skipped and counted, never fatal. With fewer shards than
ranks x workers some readers would get nothing -- WebDataset then raises "No samples found" or a
distributed run hangs -- so that case is refused up front with the fix.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from brics_cli.core.images import FORMAT_NAMES, array_to_tensor
from brics_cli.data.config import DataConfig
from brics_cli.errors import BricsError, ConfigError

IMAGE_EXTS = tuple(FORMAT_NAMES)  # the sample keys that hold an image: png, jpg, jpeg, webp


def shard_urls(shards: str, split: str) -> list[str]:
    """The shard URLs of `split`: from a `brics shard` folder's manifest, or a brace pattern."""
    folder = Path(shards)
    if folder.is_dir():
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            raise ConfigError(f"data.shards: {folder} has no manifest.json; write it with `brics shard ... --out {folder}`")
        names = [n for n in json.loads(manifest.read_text())["shards"] if n.startswith(f"{split}-")]
        urls = [str(folder / n) for n in sorted(names)]
    else:
        import braceexpand

        urls = list(braceexpand.braceexpand(shards))
        if len(urls) == 1 and "://" not in shards and not shards.startswith("pipe:") and not Path(shards).exists():
            raise ConfigError(f"data.shards: {shards} is neither a shard folder nor a shard URL pattern")
    if not urls:
        raise ConfigError(f"data.shards: no '{split}' shards in {shards}")
    return urls


class SkipCounter:
    """Corrupt samples seen by any DataLoader worker (a shared counter inherited by the workers)."""

    def __init__(self) -> None:
        self.value = mp.get_context("fork").Value("i", 0) if "fork" in mp.get_all_start_methods() else mp.Value("i", 0)

    def add(self, n: int = 1) -> None:
        with self.value.get_lock():
            self.value.value += n

    @property
    def count(self) -> int:
        return self.value.value


def decode_image(files: dict[str, Any], resolution: int) -> torch.Tensor:
    """Encoded image -> float tensor (3, H, W) in [-1, 1]; raises ValueError for anything unusable."""
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        raise ValueError(f"no image in sample (files: {sorted(k for k in files if not k.startswith('__'))})")
    img = Image.open(io.BytesIO(files[ext]))
    img.load()
    if img.size != (resolution, resolution):
        raise ValueError(f"image is {img.size[0]}x{img.size[1]}, expected {resolution}x{resolution} (data.resolution)")
    return array_to_tensor(np.asarray(img.convert("RGB")))


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples of one split for one rank; DataLoader workers split the rank's shards among them."""

    def __init__(self, cfg: DataConfig, split: str = "train", rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.cfg, self.split, self.rank, self.world_size, self.seed = cfg, split, rank, world_size, seed
        self.urls = shard_urls(cfg.shards, split)
        readers = world_size * max(num_workers, 1)
        if not cfg.resample and len(self.urls) < readers:
            raise BricsError(
                f"{len(self.urls)} '{split}' shards cannot feed {world_size} rank(s) x {max(num_workers, 1)} worker(s): "
                f"reshard with a smaller --shard-size, use fewer data.workers, or set data.resample=true"
            )
        self.skipped = SkipCounter()
        self.epoch = 0

    def _handler(self, exc: Exception) -> bool:
        self.skipped.add()
        return True  # keep going

    def _rank_shards(self, src):
        for i, shard in enumerate(src):
            if i % self.world_size == self.rank:
                yield shard

    def _pipeline(self) -> wds.DataPipeline:
        if self.cfg.resample:
            shards = [wds.ResampledShards(self.urls, seed=self.seed + 1000 * self.rank + self.epoch, deterministic=True)]
        else:
            shards = [wds.SimpleShardList(self.urls), self._rank_shards]
        stages = [*shards, wds.split_by_worker, wds.tarfile_to_samples(handler=self._handler)]
        if self.cfg.shuffle > 0:
            rng = random.Random(self.seed + 7919 * self.rank + self.epoch)
            stages.append(wds.shuffle(self.cfg.shuffle, initial=min(self.cfg.shuffle, 100), rng=rng))
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = torch.utils.data.get_worker_info()
        flip_rng = random.Random(self.seed * 31 + self.rank * 1009 + (info.id if info else 0) + 7 * self.epoch)
        produced = 0
        limit = self.cfg.epoch_length
        if limit is not None:  # per reader: the epoch's samples are spread over ranks and workers
            readers = self.world_size * (info.num_workers if info else 1)
            limit = -(-limit // readers)
        for sample in self._pipeline():
            try:
                image = decode_image(sample, self.cfg.resolution)
            except Exception:  # corrupt or wrong-size sample: counted, not fatal
                self.skipped.add()
                continue
            if self.cfg.flip and flip_rng.random() < 0.5:
                image = image.flip(-1)
            yield image, sample["__key__"]
            produced += 1
            if limit is not None and produced >= limit:
                return


def make_loader(
    cfg: DataConfig, batch_size: int, split: str = "train", rank: int = 0, world_size: int = 1, seed: int = 0
) -> tuple[torch.utils.data.DataLoader, ShardDataset]:
    """A DataLoader over the split for this rank, and its dataset (for `skipped.count` and `epoch`)."""
    dataset = ShardDataset(cfg, split, rank, world_size, cfg.workers, seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=cfg.workers, drop_last=split == "train",
        persistent_workers=False, multiprocessing_context="fork" if cfg.workers > 0 else None,
        # Its own generator: creating an iterator then never draws from the global torch RNG, so a
        # resumed run's model noise continues exactly where the uninterrupted run's would be.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, dataset
