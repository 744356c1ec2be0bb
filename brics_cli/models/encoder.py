"""Image encoder E: x -> key-code logits (paper Sec. 3.1, Suppl. A.1 and A.4).

The paper's encoder "follows the design of VQ-GAN" (Esser et al., taming-transformers; the same
encoder is reused by latent diffusion), with the unit channel set to 32 and self-attention at the
code resolution min(H_z, W_z) (Suppl. A.1). This module is that design, written afresh:

    conv_in 3x3 -> channels
    for each level i = 0 .. n_down (channels * ch_mult[i] channels, as in VQGAN and LDM):
        num_res_blocks x [ResnetBlock, AttnBlock if the current resolution is in attn_resolutions]
        Downsample (pad right/bottom by 1, 3x3 stride-2 conv), except after the last level
    mid (if mid_block): ResnetBlock, AttnBlock (if mid_attention), ResnetBlock
    GroupNorm, activation, conv_out (3x3, or 1x1) -> out_channels

n_down = log2(resolution / code_resolution) and, as in VQGAN, len(ch_mult) = n_down + 1: every level
but the last ends in a downsampling (a list of another length is an error that suggests one).
`ch_mult: null` (the default) derives the widths from n_down by the authors' rule, level i having
min(512, channels * 2^(i+1)) channels: 64, 128, 256 at 256, 128, 64 for 256 -> 64 with channels 32
(ch_mult [2, 4, 8]), 64 .. 512, 512 for 256 -> 16. The encoder returns *logits*: the autoencoder
appends the sigmoid that puts z in [0, 1] (Sec. 3.1), or, for the KL variant (Suppl. A.4), asks
for 2 * C_z channels and splits them into (mu, logvar) before z = sigmoid(mu + sigma * eps).

`layout` picks the defaults of the fields left null (an explicit value always wins):

    vqgan (paper)  mid block, swish, 3x3 conv_out             6,106,436 parameters at 256 -> 64x64x4
    authors        no mid block, leaky ReLU 0.01, 1x1 conv_out 3,472,196 parameters at 256 -> 64x64x4

`authors` is the encoder of the authors' code (REFERENCES Sec. 8; `training/encoder.py` of their
StyleGAN3 fork, built with ch 32, max_ch 512 and num_downsamples): it never runs the mid block
(the call is commented out of `forward`; VQGAN's mid block at 256 channels alone is 2.63M), uses
leaky ReLU and a 1x1 conv_out. "Levels 32 -> 64 -> 128 -> 256" and "64/128/256 channels at
256/128/64" describe the same network: 32 is conv_in's width, each level's first res block widens
to 64, 128, 256 (LDM's in_ch_mult = (1,) + ch_mult). Their ~3.47M is that layout's count; reading
the levels as ch_mult [1, 2, 4, 8] (32, 64, 128, 256 channels, the last without downsampling) gives
3.50M, and a 3x3 conv_out 3.48M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from brics_cli.errors import ConfigError

# Slope of the leaky ReLU option: the authors' encoder calls F.leaky_relu with its default, 0.01.
LEAKY_SLOPE = 0.01
# Widest level of a derived ch_mult: the authors' max_ch.
DERIVED_MAX_CHANNELS = 512
# What each layout puts in the fields left null.
LAYOUT_DEFAULTS: dict[str, dict[str, Any]] = {
    "vqgan": {"mid_block": True, "activation": "silu", "conv_out_kernel": 3},
    "authors": {"mid_block": False, "activation": "leaky_relu", "conv_out_kernel": 1},
}


class EncoderLevelsError(ConfigError, ValueError):
    """ch_mult does not fit the resolutions: a config error (exit 2) that is also the ValueError of a bad size."""


@dataclass
class EncoderConfig:
    layout: Literal["vqgan", "authors"] = "vqgan"  # the paper's VQGAN encoder | the authors' code (module doc)
    channels: int = 32  # unit channel (paper Suppl. A.1: 32)
    ch_mult: list[int] | None = None  # level widths / channels, len = n_down + 1; null: min(512, ch 2^(i+1)) / ch
    num_res_blocks: int = 2
    attn_resolutions: list[int] | None = None  # None = [min(H_z, W_z)] (paper Suppl. A.1)
    mid_block: bool | None = None  # null: the layout's (vqgan: true, authors: false)
    mid_attention: bool = True  # attention between the two mid res blocks, when mid_block
    dropout: float = 0.0
    activation: Literal["silu", "leaky_relu"] | None = None  # null: vqgan swish, authors leaky ReLU
    conv_out_kernel: int | None = None  # null: vqgan 3, authors 1

    def __post_init__(self) -> None:
        # Fill the fields left null from the layout, so a stored config says what was built.
        for key, value in LAYOUT_DEFAULTS.get(self.layout, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def validate(self) -> None:
        if self.layout not in LAYOUT_DEFAULTS:
            raise ValueError(f"ae.encoder.layout must be 'vqgan' or 'authors', got {self.layout!r}")
        if self.channels <= 0:
            raise ValueError(f"channels must be positive, got {self.channels}")
        if self.ch_mult is not None and not self.ch_mult:
            raise ValueError("ch_mult must have at least one multiplier, e.g. [1, 2, 4], or be null (derived)")
        if self.ch_mult is not None and any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"every ch_mult entry must be positive, got {self.ch_mult}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.attn_resolutions is not None and any(r <= 0 for r in self.attn_resolutions):
            raise ValueError(f"attn_resolutions must be positive, got {self.attn_resolutions}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ("silu", "leaky_relu"):
            raise ValueError(f"activation must be 'silu' or 'leaky_relu', got {self.activation!r}")
        if self.conv_out_kernel not in (1, 3):
            raise ValueError(f"ae.encoder.conv_out_kernel must be 1 or 3, got {self.conv_out_kernel}")

    def level_multipliers(self, resolution: int, code_resolution: int) -> list[int]:
        """ch_mult for resolution -> code_resolution: the given list, checked, or the derived one (module doc)."""
        n_down = num_downsamples(resolution, code_resolution)
        if self.ch_mult is None:
            return [min(DERIVED_MAX_CHANNELS, self.channels * 2 ** (i + 1)) // self.channels for i in range(n_down + 1)]
        given = list(self.ch_mult)
        if len(given) != n_down + 1:
            fix = given[: n_down + 1] if len(given) > n_down + 1 else given + [given[-1]] * (n_down + 1 - len(given))
            raise EncoderLevelsError(
                f"ae.encoder.ch_mult {given} has {len(given)} levels, so {len(given) - 1} downsampling steps, but "
                f"{resolution} -> {code_resolution} needs {n_down} (len(ch_mult) - 1 = log2(image / code resolution), "
                f"as in VQGAN); use e.g. ae.encoder.ch_mult={fix}, or ae.encoder.ch_mult=null to derive the widths"
            )
        return given


def upgrade_legacy_config(stored: dict[str, Any], resolution: int, code_resolution: int) -> dict[str, Any]:
    """A checkpoint's `ae.encoder` from before ch_mult took VQGAN's meaning (2026-12-02; it has no
    `layout`), in today's meaning. Then a short ch_mult was extended by repeating its last multiplier
    (spelled out here: the same network); a long one ran its extra levels at the code resolution
    without downsampling, which no config builds now: ValueError naming both counts."""
    stored = dict(stored)
    given = list(stored.get("ch_mult", [1, 2, 4, 8]))  # the default of that time
    n_down = num_downsamples(resolution, code_resolution)
    if len(given) > n_down + 1:
        raise ValueError(
            f"it was written before 2026-12-02 by a brics whose ae.encoder.ch_mult {given} ran {len(given) - 1 - n_down} "
            f"of its {len(given)} levels at the code resolution without downsampling ({resolution} -> {code_resolution} "
            f"needs {n_down} downsamplings); this version builds only VQGAN's layout (len(ch_mult) - 1 downsamplings) and cannot "
            "rebuild it: retrain the autoencoder, or use a brics from before 2026-12-02 for this checkpoint"
        )
    stored["ch_mult"] = given + [given[-1]] * (n_down + 1 - len(given))
    return stored


def group_norm(channels: int) -> nn.GroupNorm:
    # VQGAN uses 32 groups; gcd keeps tiny test models (8 or 16 channels) valid.
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6, affine=True)


def make_activation(name: str) -> nn.Module:
    return nn.SiLU() if name == "silu" else nn.LeakyReLU(LEAKY_SLOPE)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GN, act, conv3x3) x 2 with dropout before the 2nd conv."""

    def __init__(self, in_ch: int, out_ch: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.act = make_activation(activation)
        # 1x1 "network-in-network" shortcut only when the width changes.
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))  # (B, out_ch, H, W)
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, H*W, C): every pixel is a token.
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (B, H*W, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W with a 3x3 stride-2 conv; VQGAN pads only right/bottom so 2k -> k exactly."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def num_downsamples(resolution: int, code_resolution: int) -> int:
    """log2(resolution / code_resolution); ValueError naming both numbers unless a power of two."""
    ratio, remainder = divmod(resolution, code_resolution) if code_resolution > 0 else (0, 1)
    if resolution <= 0 or remainder or ratio < 1 or ratio & (ratio - 1):
        raise ValueError(
            f"image resolution {resolution} / code resolution {code_resolution} must be a power of "
            "two >= 1 (e.g. 256 -> 64, 32 or 16)"
        )
    return ratio.bit_length() - 1


class Encoder(nn.Module):
    """VQGAN-style encoder: (B, in_channels, R, R) in [-1, 1] -> (B, out_channels, H_z, W_z) logits.

    `self.ch_mult` is the list it runs, n_down + 1 levels: the config's, or the derived one.
    """

    def __init__(
        self,
        cfg: EncoderConfig,
        resolution: int,
        code_resolution: int,
        out_channels: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        cfg.validate()
        if out_channels <= 0 or in_channels <= 0:
            raise ValueError(f"channel counts must be positive, got in={in_channels}, out={out_channels}")
        self.cfg = cfg
        self.resolution, self.code_resolution = resolution, code_resolution
        self.n_down = num_downsamples(resolution, code_resolution)
        self.ch_mult = mults = cfg.level_multipliers(resolution, code_resolution)
        attn_res = set(cfg.attn_resolutions if cfg.attn_resolutions is not None else [code_resolution])

        self.conv_in = nn.Conv2d(in_channels, cfg.channels, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = cfg.channels, resolution
        for i, mult in enumerate(mults):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.channels * mult
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, cfg.activation, cfg.dropout))
                block_in = block_out
                # Attention follows each res block run at an attention resolution; an Identity
                # elsewhere keeps `block[j]` and `attn[j]` aligned.
                level.attn.append(AttnBlock(block_in) if res in attn_res else nn.Identity())
            if i < self.n_down:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        assert res == code_resolution, (res, code_resolution)

        self.mid = nn.Sequential()
        if cfg.mid_block:
            self.mid.append(ResnetBlock(block_in, block_in, cfg.activation, cfg.dropout))
            if cfg.mid_attention:
                self.mid.append(AttnBlock(block_in))
            self.mid.append(ResnetBlock(block_in, block_in, cfg.activation, cfg.dropout))
        self.norm_out = group_norm(block_in)
        self.act = make_activation(cfg.activation)
        k = cfg.conv_out_kernel
        self.conv_out = nn.Conv2d(block_in, out_channels, k, padding=k // 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, channels, R, R)
        for level in self.down:
            for block, attn in zip(level.block, level.attn):
                h = attn(block(h))
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # (B, C_i, H/2, W/2)
        h = self.mid(h)  # (B, C_last, H_z, W_z); empty unless mid_block
        return self.conv_out(self.act(self.norm_out(h)))  # (B, out_channels, H_z, W_z) logits
