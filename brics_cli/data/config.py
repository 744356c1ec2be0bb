"""The `data` section of a recipe: where the shards are, the image resolution, how they are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    shards: str = "shards/demo"  # folder written by `brics shard`, or a brace-expanded shard URL
    resolution: int = 256  # H = W of the training images
    workers: int = 2  # DataLoader worker processes per rank (they ignore SIGINT/SIGTERM/SIGUSR1: the trainer stops them)
    shuffle: int = 1000  # shuffle buffer in samples, and shards reshuffled every epoch (0: off, read in listed order)
    # Draw shards with replacement: an endless stream (use with epoch_length). Not split by worker:
    # every rank and worker draws its own shards, seeded by (seed, epoch, rank, worker).
    resample: bool = False
    epoch_length: int | None = None  # samples per epoch over all ranks and workers (None: one pass)
    flip: bool = True  # random horizontal flips (LDM's churches; the paper's FFHQ / LSUN training)
    # Samples that are not resolution x resolution. center-crop (default): the largest centred square,
    # resized (antialiased) to the resolution -- shards from img2dataset, webdataset.ShardWriter or public
    # releases hold photos of every size, and this is the LDM / clean-fid rule, so they train as they are;
    # `brics shard` output is already square and passes untouched. random-crop: a square of the short side
    # at a random place, new every epoch (augmentation). error: refuse the first such sample.
    resize: Literal["error", "center-crop", "random-crop"] = "center-crop"

    def validate(self) -> None:
        if self.resolution < 8 or self.resolution & (self.resolution - 1):
            raise ValueError(f"data.resolution must be a power of two >= 8, got {self.resolution}")
        if self.workers < 0 or self.shuffle < 0:
            raise ValueError("data.workers and data.shuffle must be >= 0")
        if self.epoch_length is not None and self.epoch_length < 1:
            raise ValueError(f"data.epoch_length must be >= 1 or null, got {self.epoch_length}")
