"""The `data` section of a recipe: where the shards are, the image resolution, how they are read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    shards: str = "shards/demo"  # folder written by `brics shard`, or a brace-expanded shard URL
    resolution: int = 256  # H = W of the training images
    workers: int = 2  # DataLoader worker processes per rank
    shuffle: int = 1000  # shuffle buffer in samples (0: off)
    resample: bool = False  # draw shards with replacement: an endless stream (use with epoch_length)
    epoch_length: int | None = None  # samples per epoch over all ranks and workers (None: one pass)
    flip: bool = True  # random horizontal flips (LDM's churches; the paper's FFHQ / LSUN training)

    def validate(self) -> None:
        if self.resolution < 8 or self.resolution & (self.resolution - 1):
            raise ValueError(f"data.resolution must be a power of two >= 8, got {self.resolution}")
        if self.workers < 0 or self.shuffle < 0:
            raise ValueError("data.workers and data.shuffle must be >= 0")
        if self.epoch_length is not None and self.epoch_length < 1:
            raise ValueError(f"data.epoch_length must be >= 1 or null, got {self.epoch_length}")
