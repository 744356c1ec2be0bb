"""The BRICS autoencoder: encoder -> key codes -> grid retrieval + F_mlp -> decoder (paper Sec. 3, Fig. 3).

    z     = sigmoid(E(I))                         (B, C_z, H_z, W_z) in [0,1]          Sec. 3.1
    z_hat = tile(z) (+ eps while training)        (B, C_z, H_d, W_d)                   Sec. 3.2, 3.4
    q     = [z_hat^s; x; y] per group s           (N_h, B H_d W_d, C_key + 2)          Eq. 1
    f     = concat_s F_mlp(F_inp(F_r(q^s)))       (B, C_d, H_d, W_d)                   Eq. 2
    I'    = D(f)                                  (B, 3, H, W)                         Sec. 3.3

The bottleneck is `relaxed` (Sec. 3.4: Gaussian noise of std 1/(4 r_max) while training, the paper's
default), `kl` (Suppl. A.4: z = sigmoid(mu + sigma eps) with a KL term; Table 4's config "c") or
`none` (ablation: deterministic codes).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from brics_cli.config import build
from brics_cli.core import checkpoint as ckpt
from brics_cli.errors import BricsError
from brics_cli.models.discriminator import DiscriminatorConfig
from brics_cli.models.encoder import Encoder, EncoderConfig, upgrade_legacy_config
from brics_cli.models.grid import GridConfig
from brics_cli.models.keycode import relaxed_precision_noise, tile_key_codes
from brics_cli.models.retrieval import FeatureRetrieval, MLPConfig
from brics_cli.registry import DECODERS


@dataclass
class CodeConfig:
    resolution: int = 64  # H_z = W_z
    channels: int = 4  # C_z = N_h * C_key
    key_channels: int = 1  # C_key
    bottleneck: Literal["relaxed", "kl", "none"] = "relaxed"
    tiling: Literal["interleaved", "whole"] = "interleaved"

    def validate(self) -> None:
        if self.resolution < 1 or self.key_channels < 1:
            raise ValueError("ae.code.resolution and ae.code.key_channels must be >= 1")
        if self.channels % self.key_channels:
            raise ValueError(
                f"ae.code.channels (C_z = {self.channels}) must be a multiple of ae.code.key_channels "
                f"(C_key = {self.key_channels})"
            )


@dataclass
class FeatureBlockConfig:
    resolution: int = 64  # H_d = W_d, the decoder's input size
    channels: int = 512  # C_d


def _default_decoder() -> Any:
    return DECODERS.get("stylegan").Config()


@dataclass
class AutoencoderConfig:
    code: CodeConfig = field(default_factory=CodeConfig)
    features: FeatureBlockConfig = field(default_factory=FeatureBlockConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    # `{name: stylegan, ...}`: the options are the registered decoder's own Config dataclass.
    decoder: Any = field(default_factory=_default_decoder, metadata={"registry": DECODERS})
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    @property
    def groups(self) -> int:  # N_h
        return self.code.channels // self.code.key_channels

    @property
    def r_max(self) -> float:
        """ae.grid.r_max, or the paper's rule (Suppl. A.1): 64 for 64x64 codes, 32 up to 32x32."""
        if self.grid.r_max is not None:
            return self.grid.r_max
        return 64.0 if self.code.resolution > 32 else 32.0

    def validate(self) -> None:
        H_z, H_d = self.code.resolution, self.features.resolution
        if H_d < H_z or H_d % H_z:
            raise ValueError(
                f"ae.features.resolution (H_d = {H_d}) must be a whole multiple of ae.code.resolution (H_z = {H_z})"
            )
        if self.features.channels % self.groups:
            raise ValueError(
                f"ae.features.channels (C_d = {self.features.channels}) must be divisible by the number of "
                f"groups N_h = C_z / C_key = {self.groups}"
            )
        if self.grid.r_max is None and self.r_max < self.grid.r_min:
            raise ValueError(f"ae.grid.r_min ({self.grid.r_min}) exceeds the automatic r_max ({self.r_max}); set ae.grid.r_max")


class AutoencoderOutput(NamedTuple):
    recon: Tensor  # (B, 3, H, W)
    z: Tensor  # (B, C_z, H_z, W_z) key codes in [0,1]
    kl: Tensor | None  # (B,) KL summed over each image's C_z H_z W_z code values (`kl` bottleneck), else None;
    # train.losses.kl_loss normalises it (ae.loss.kl_normalise)


class BRICSAutoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig, resolution: int, in_channels: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.resolution = resolution
        C_z = cfg.code.channels
        enc_out = 2 * C_z if cfg.code.bottleneck == "kl" else C_z
        self.encoder = Encoder(cfg.encoder, resolution, cfg.code.resolution, enc_out, in_channels)
        self.retrieval = FeatureRetrieval(
            cfg.grid, cfg.mlp, cfg.groups, cfg.code.key_channels, cfg.r_max, cfg.features.channels
        )
        decoder_cls = DECODERS.get(cfg.decoder.name)
        # A decoder that takes `groups` (stylegan's per-group style) is told N_h; plugins keep 5 arguments.
        extra = {"groups": cfg.groups} if "groups" in inspect.signature(decoder_cls).parameters else {}
        self.decoder = decoder_cls(cfg.decoder, cfg.features.channels, cfg.features.resolution, resolution, in_channels, **extra)

    @classmethod
    def from_checkpoint(cls, path: Path, ema: bool = True, device: str | torch.device = "cpu") -> "BRICSAutoencoder":
        """The (EMA) autoencoder of an ae-train checkpoint, in eval mode; `.checkpoint_meta` is its metadata.

        The checkpoint alone rebuilds the model: its metadata holds the resolved config and the
        decoder's registry name (with the distribution that provides it)."""
        meta = ckpt.read_metadata(path)
        if meta.get("kind") != "ae":
            raise BricsError(f"{path}: a '{meta.get('kind')}' checkpoint, not an autoencoder one")
        cfg, resolution = autoencoder_config(meta, path)
        model = cls(cfg, resolution)
        model.load_state_dict(ckpt.load_tensors(path, "ema." if ema else "ae."))
        model.checkpoint_meta = meta
        return model.to(device).eval()

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Images (B, 3, H, W) in [-1, 1] -> key codes z in [0,1] and, for `kl`, the KL per image."""
        logits = self.encoder(x)
        if self.cfg.code.bottleneck != "kl":
            return torch.sigmoid(logits), None
        mu, logvar = logits.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)  # as LDM's DiagonalGaussian, keeps exp() finite
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
        if self.training:
            mu = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return torch.sigmoid(mu), kl

    def features(self, z: Tensor) -> Tensor:
        """Key codes (B, C_z, H_z, W_z) -> feature block f (B, C_d, H_d, W_d)."""
        H_d = self.cfg.features.resolution
        z_hat = tile_key_codes(z, (H_d, H_d), self.cfg.code.tiling)
        if self.training and self.cfg.code.bottleneck == "relaxed":
            z_hat = relaxed_precision_noise(z_hat, self.cfg.r_max)  # Sec. 3.4, AE training only
        return self.retrieval(z_hat)  # Eq. 1-2: queries [z_hat^s; x; y] -> f

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.features(z))

    def forward(self, x: Tensor) -> AutoencoderOutput:
        z, kl = self.encode(x)
        return AutoencoderOutput(self.decode(z), z, kl)


def decoder_provenance(name: str) -> dict[str, Any]:
    """What a checkpoint records of its decoder: registry name, module, distribution and version."""
    DECODERS.get(name)
    entry = next(e for e in DECODERS.entries() if e.name == name)
    return {"name": name, "module": entry.module, "distribution": entry.distribution, "version": entry.version}


def autoencoder_config(meta: dict[str, Any], source: Path) -> tuple[AutoencoderConfig, int]:
    """The model config and image resolution recorded in a checkpoint's metadata."""
    decoder = meta.get("decoder", {})
    name = decoder.get("name")
    if name and name not in DECODERS:
        dist = decoder.get("distribution") or f"the plugin providing '{name}'"
        raise BricsError(
            f"{source}: the model uses decoder '{name}' from distribution {dist} "
            f"{decoder.get('version') or ''}, which is not installed; `pip install {dist}` (e.g. pip install -e plugins/{dist})"
        )
    try:
        fields = set(AutoencoderConfig.__dataclass_fields__)
        data = {k: v for k, v in meta["config"]["ae"].items() if k in fields}
        resolution = int(meta["config"]["data"]["resolution"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BricsError(f"{source}: malformed brics metadata (no usable config.ae / config.data.resolution: {exc!r})") from exc
    encoder = data.get("encoder")
    if isinstance(encoder, dict) and "layout" not in encoder:  # ch_mult of before 2026-12-02
        code_resolution = (data.get("code") or {}).get("resolution", CodeConfig.resolution)
        try:
            data["encoder"] = upgrade_legacy_config(encoder, resolution, code_resolution)
        except ValueError as exc:
            raise BricsError(f"{source}: {exc}") from exc
    return build(AutoencoderConfig, data, "ae"), resolution
