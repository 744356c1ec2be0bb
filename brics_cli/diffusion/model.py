"""A trained diffusion model as inference needs it: the UNet, its schedule and the code shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from brics_cli.config import build, move_renamed_keys
from brics_cli.core import checkpoint as ckpt
from brics_cli.diffusion.config import DiffusionStageConfig
from brics_cli.diffusion.schedules import Schedule, build_schedule
from brics_cli.errors import BricsError
from brics_cli.models.unet import UNet


@dataclass
class DiffusionModel:
    unet: UNet  # eval mode
    schedule: Schedule
    code_shape: tuple[int, int, int]  # (C_z, H_z, W_z)
    config: DiffusionStageConfig
    meta: dict[str, Any]  # the checkpoint's metadata

    @classmethod
    def from_checkpoint(cls, path: Path, ema: bool = True, device: str | torch.device = "cpu") -> "DiffusionModel":
        """The (EMA) UNet of a diffusion-train checkpoint with the schedule it was trained with."""
        meta = ckpt.read_metadata(path)
        if meta.get("kind") != "diffusion":
            raise BricsError(f"{path}: a '{meta.get('kind')}' checkpoint, not a diffusion one")
        try:
            stage = build(DiffusionStageConfig, move_renamed_keys(meta["config"])["diffusion"], "diffusion")  # older runs: old key names
            C, H, W = meta["code_shape"]
        except (KeyError, TypeError, ValueError) as exc:
            raise BricsError(f"{path}: malformed brics metadata (no usable config.diffusion / code_shape: {exc!r})") from exc
        unet = UNet(stage.model, C, H)
        unet.load_state_dict(ckpt.load_tensors(path, "ema." if ema else "unet."))
        return cls(unet.to(device).eval(), build_schedule(stage.schedule), (C, H, W), stage, meta)
