"""VQGAN decoder (taming-transformers' `Decoder`, Esser et al. 2021), written afresh for BRICS.

Input: the feature block f (B, C_d, H_d, W_d); output: an image (B, out_channels, R, R), R = H_d * 2^k.

    conv_in 3x3: C_d -> ch * ch_mult[-1]
    mid:         ResBlock, AttnBlock (single head), ResBlock
    levels, from the lowest resolution (H_d, ch * ch_mult[-1]) up to R (ch * ch_mult[0]):
                 num_res_blocks + 1 ResBlocks, each followed by an AttnBlock when the current
                 resolution is in attn_resolutions; then nearest x2 + conv 3x3 (not at the last level)
    out:         GroupNorm(32), swish, conv_out 3x3 -> out_channels

ResBlock: GN(32) + swish + conv3x3, GN(32) + swish + dropout + conv3x3, plus the input (through a
1x1 "nin" conv when the channel count changes). The number of upsamplings log2(R / H_d) must equal
len(ch_mult) - 1: taming's f16 config (ch 128, ch_mult [1, 1, 2, 2, 4]) maps 16x16 to 256x256;
for a 64x64 feature block to 256 use e.g. ch_mult [1, 2, 4].

In taming's f16 configuration (z_channels 256, 16x16 -> 256x256) this decoder has 42,449,795
parameters and 126.4 GMAC at batch 1 (torch.utils.flop_counter / 2), matching REFERENCES Sec. 4
(42.5M, 126.4 GMAC counted by hand).
No tanh: images come out on the [-1, 1] scale, unclamped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brics_cli.models.encoder import AttnBlock, ResnetBlock, group_norm  # shared with the encoder
from brics_cli.registry import DECODERS

NUM_GROUPS = 32


F16_CH_MULT = (1, 1, 2, 2, 4)  # taming's f16 VQGAN: 16x16 -> 256x256


@dataclass
class VQGANDecoderConfig:
    name: str = "vqgan"  # registry name; every decoder config starts with this field
    ch: int = 128  # base channel count; level i has ch * ch_mult[i] channels
    # len - 1 = number of x2 upsamplings. null: the last log2(R / H_d) + 1 multipliers of taming's f16
    # [1, 1, 2, 2, 4] -- f16 itself for 16 -> 256, [2, 2, 4] for a 64x64 feature block (Table 9), so
    # the lowest level keeps ch * 4 = 512 channels and the decoder follows the block it decodes.
    ch_mult: list[int] | None = None
    num_res_blocks: int = 2  # per level the decoder runs num_res_blocks + 1 ResBlocks (as in taming)
    attn_resolutions: list[int] = field(default_factory=lambda: [16])  # resolutions with self-attention
    dropout: float = 0.0

    def validate(self) -> None:
        if self.ch <= 0:
            raise ValueError(f"decoder ch must be positive, got {self.ch}")
        if self.ch_mult is not None and (not self.ch_mult or any(m <= 0 for m in self.ch_mult)):
            raise ValueError(f"decoder ch_mult must be a non-empty list of positive integers, got {self.ch_mult}")
        bad = [self.ch * m for m in (self.ch_mult or F16_CH_MULT) if (self.ch * m) % NUM_GROUPS]
        if bad:
            raise ValueError(
                f"decoder channels ch * ch_mult must be multiples of {NUM_GROUPS} (GroupNorm groups), "
                f"got ch {self.ch} and ch_mult {self.ch_mult} (channels {bad})"
            )
        if self.num_res_blocks < 0:
            raise ValueError(f"decoder num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if any(r <= 0 for r in self.attn_resolutions):
            raise ValueError(f"decoder attn_resolutions must be positive, got {self.attn_resolutions}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"decoder dropout must be in [0, 1), got {self.dropout}")


def ResBlock(in_ch: int, out_ch: int, dropout: float = 0.0) -> ResnetBlock:
    """GN + swish + conv3x3, GN + swish + dropout + conv3x3, plus a (1x1-projected) shortcut:
    the same block as brics' VQGAN-style encoder."""
    return ResnetBlock(in_ch, out_ch, "silu", dropout)


class Upsample(nn.Module):
    """Nearest x2, then conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ResBlocks (each optionally followed by attention), then optionally x2 up."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, attn: bool, upsample: bool, dropout: float) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            [ResBlock(in_ch if i == 0 else out_ch, out_ch, dropout) for i in range(n_blocks)]
        )
        self.attn = nn.ModuleList([AttnBlock(out_ch) for _ in range(n_blocks)] if attn else [])
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return self.upsample(x) if self.upsample is not None else x


@DECODERS.register("vqgan")
class VQGANDecoder(nn.Module):
    """The VQGAN decoder driven by the feature block f."""

    Config = VQGANDecoderConfig

    def __init__(
        self,
        cfg: VQGANDecoderConfig,
        in_channels: int,
        in_resolution: int,
        out_resolution: int,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        cfg.validate()
        if in_channels <= 0 or out_channels <= 0 or in_resolution <= 0:
            raise ValueError(
                f"decoder in_channels, out_channels and in_resolution must be positive, got "
                f"{in_channels}, {out_channels} and {in_resolution}"
            )
        n_up = _log2_ratio(in_resolution, out_resolution)
        if cfg.ch_mult is None:
            if n_up + 1 > len(F16_CH_MULT):
                raise ValueError(f"decoder upsamples {in_resolution} -> {out_resolution} ({n_up} x2 steps): more than "
                                 f"f16's {len(F16_CH_MULT) - 1}; give decoder ch_mult with {n_up + 1} entries")
            cfg = replace(cfg, ch_mult=list(F16_CH_MULT[len(F16_CH_MULT) - n_up - 1:]))
        if n_up != len(cfg.ch_mult) - 1:
            raise ValueError(
                f"decoder upsamples {in_resolution} -> {out_resolution} ({n_up} x2 steps), but ch_mult "
                f"{cfg.ch_mult} has {len(cfg.ch_mult)} levels, i.e. {len(cfg.ch_mult) - 1} upsamplings; "
                f"ch_mult needs {n_up + 1} entries"
            )
        self.cfg = cfg
        self.in_channels, self.in_resolution, self.out_resolution = in_channels, in_resolution, out_resolution
        chans = [cfg.ch * m for m in cfg.ch_mult]
        block_in = chans[-1]
        self.conv_in = nn.Conv2d(in_channels, block_in, 3, padding=1)
        self.mid = nn.Sequential(
            ResBlock(block_in, block_in, cfg.dropout), AttnBlock(block_in), ResBlock(block_in, block_in, cfg.dropout)
        )
        levels, res = [], in_resolution
        for i in reversed(range(len(chans))):  # lowest resolution first
            levels.append(
                Level(block_in, chans[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions, i != 0, cfg.dropout)
            )
            block_in = chans[i]
            res = res * 2 if i != 0 else res
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, f: Tensor) -> Tensor:
        if f.ndim != 4 or f.shape[1] != self.in_channels or f.shape[2:] != (self.in_resolution, self.in_resolution):
            raise ValueError(
                f"decoder expects features (B, {self.in_channels}, {self.in_resolution}, {self.in_resolution}), "
                f"got {tuple(f.shape)}"
            )
        # channels_last: oneDNN's native layout on CPU, where it makes these convs ~1.3x faster (and
        # cuDNN's on tensor cores); every layer here keeps the layout. The output is plain NCHW.
        h = self.mid(self.conv_in(f.contiguous(memory_format=torch.channels_last)))  # (B, ch * ch_mult[-1], H_d, W_d)
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()  # (B, out_channels, R, R)


def _log2_ratio(in_resolution: int, out_resolution: int) -> int:
    """k with out_resolution = in_resolution * 2^k (k >= 0), else ValueError naming both."""
    ratio = out_resolution / in_resolution
    k = round(math.log2(ratio)) if ratio >= 1 else -1
    if k < 0 or in_resolution * 2**k != out_resolution:
        raise ValueError(
            f"decoder out_resolution ({out_resolution}) must be in_resolution ({in_resolution}) times a "
            f"power of two (1, 2, 4, ...)"
        )
    return k
