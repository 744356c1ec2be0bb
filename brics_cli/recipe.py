"""A recipe: the whole pipeline for one dataset in one YAML file (DESIGN.md section 1).

Sections: `data` (brics_cli/data/config.py), `run` (below), `ae` (the autoencoder model of
brics_cli/models/autoencoder.py plus its loss and optimiser), `diffusion` (the UNet, schedule,
optimiser, training and sampling of brics_cli/diffusion/config.py). Later stages add their own sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from brics_cli.config import load_config, to_dict
from brics_cli.errors import ConfigError
from brics_cli.registry import closest
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

    # A resumed run may change how it trains (loss weights, schedule, logging); everything else --
    # the architecture and the optimiser -- and data.resolution must equal the checkpoint's.
    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = ("loss", "train")


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ae: AEStageConfig = field(default_factory=AEStageConfig)
    diffusion: DiffusionStageConfig = field(default_factory=DiffusionStageConfig)

    def resume_conflicts(self, saved: dict[str, Any], stage: str) -> list[str]:
        """Dotted keys whose value differs from a checkpoint's recorded config `saved` and must not."""
        mine = to_dict(self)
        if stage == "ae":
            keys = [f"ae.{k}" for k in sorted(set(mine["ae"]) | set(saved.get("ae", {}))) if k not in AEStageConfig.RESUME_MAY_CHANGE]
            keys.append("data.resolution")
        else:
            keys = [f"diffusion.{k}" for k in DiffusionStageConfig.RESUME_MUST_MATCH]
        return [key for key in keys if _lookup(mine, key) != _lookup(saved, key)]

    def validate(self) -> None:
        # The UNet runs on the key codes: its levels and attention resolutions must fit H_z.
        self.diffusion.model.check_resolution(self.ae.code.resolution)


PRESETS = Path(__file__).resolve().parent / "recipes"  # shipped in the wheel (package data)


def presets() -> dict[str, Path]:
    """The packaged recipes by name: church, demo, ffhq, webvid."""
    return {p.stem: p for p in sorted(PRESETS.glob("*.yaml"))}


def describe_preset(path: Path) -> str:
    """A preset's first comment line: what it is."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_recipe(path: str | Path) -> Path:
    """A recipe file, or the name of a packaged preset (`church`, `demo`, ...) when no such file exists."""
    path = Path(path)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    known = presets()
    if str(path) in known:
        return known[str(path)]
    hint = closest(str(path), list(known))
    raise ConfigError(f"recipe '{path}' is neither a file nor a preset; presets: {', '.join(known)}"
                      + (f"; did you mean '{hint}'?" if hint else "") + " (`brics recipes list`)")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file or preset with `section.key=value` overrides; strict about keys and types."""
    return load_config(Recipe, resolve_recipe(path), overrides)


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree
