"""A recipe: the whole pipeline for one dataset in one YAML file (DESIGN.md section 1).

Sections: `data` (brics_cli/data/config.py), `run` (below), `ae` (the autoencoder model of
brics_cli/models/autoencoder.py plus its loss and optimiser), `diffusion` (the UNet, schedule,
optimiser, training and sampling of brics_cli/diffusion/config.py). Later stages add their own sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from brics_cli.config import load_config
from brics_cli.data.config import DataConfig
from brics_cli.diffusion.config import DiffusionStageConfig
from brics_cli.models.autoencoder import AutoencoderConfig
from brics_cli.train.ae import AETrainConfig
from brics_cli.train.losses import AELossConfig
from brics_cli.train.optim import AEOptimConfig


@dataclass
class RunConfig:
    dir: str = "runs/demo"  # where ae/, codes/ and diffusion/ go


@dataclass
class AEStageConfig(AutoencoderConfig):
    loss: AELossConfig = field(default_factory=AELossConfig)
    optim: AEOptimConfig = field(default_factory=AEOptimConfig)
    train: AETrainConfig = field(default_factory=AETrainConfig)


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ae: AEStageConfig = field(default_factory=AEStageConfig)
    diffusion: DiffusionStageConfig = field(default_factory=DiffusionStageConfig)

    def validate(self) -> None:
        # The UNet runs on the key codes: its levels and attention resolutions must fit H_z.
        self.diffusion.model.check_resolution(self.ae.code.resolution)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file with `section.key=value` overrides; strict about keys and types."""
    return load_config(Recipe, path, overrides)
