"""The `data` section of a recipe: where the shards are and the image resolution."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    shards: str = "shards/demo"  # folder of {train,val}-NNNNNN.tar written by `brics shard`
    resolution: int = 256  # H = W of the training images

    def validate(self) -> None:
        if self.resolution < 8 or self.resolution & (self.resolution - 1):
            raise ValueError(f"data.resolution must be a power of two >= 8, got {self.resolution}")
