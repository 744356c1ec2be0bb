"""MoVQ decoder (Zheng et al. 2022): the VQGAN decoder with spatially conditioned normalisation.

Same topology as the VQGAN decoder (taming-transformers), written afresh for BRICS:

    conv_in 3x3: C_d -> ch * ch_mult[-1]
    mid:         ResBlock, AttnBlock (single head), ResBlock
    levels, from the lowest resolution (H_d) up to R: num_res_blocks + 1 ResBlocks, each followed by
                 an AttnBlock when the resolution is in attn_resolutions; then nearest x2 + conv 3x3
                 (not at the last level)
    out:         SpatialNorm, swish, conv_out 3x3 -> out_channels

but every GroupNorm (in the ResBlocks, the AttnBlocks and the final norm) is a SpatialNorm:

    SpatialNorm(h, zq) = GN(h) * conv_y(zq') + conv_b(zq'),   zq' = nearest-resize(zq, size of h)

with GN = GroupNorm(32, affine=False) and conv_y, conv_b 1x1 convs from zq_channels to h's channels.
Here zq is the decoder input f itself (B, C_d, H_d, W_d), so zq_channels = C_d. The number of
upsamplings log2(R / H_d) must equal len(ch_mult) - 1. No tanh: output on the [-1, 1] scale.

This package stands alone (no import from brics-vqgan); it imports the host brics only for the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brics_cli.registry import DECODERS

NUM_GROUPS = 32


F16_CH_MULT = (1, 1, 2, 2, 4)  # taming's f16 VQGAN: 16x16 -> 256x256


@dataclass
class MoVQDecoderConfig:
    name: str = "movq"  # registry name; every decoder config starts with this field
    ch: int = 128  # base channel count; level i has ch * ch_mult[i] channels
    # len - 1 = number of x2 upsamplings. null: the last log2(R / H_d) + 1 multipliers of taming's f16
    # [1, 1, 2, 2, 4] -- f16 itself for 16 -> 256, [2, 2, 4] for a 64x64 feature block (Table 9), so
    # the lowest level keeps ch * 4 = 512 channels and the decoder follows the block it decodes.
    ch_mult: list[int] | None = None
    num_res_blocks: int = 2  # per level the decoder runs num_res_blocks + 1 ResBlocks (as in taming)
    attn_resolutions: list[int] = field(default_factory=lambda: [16])  # resolutions with self-attention
    dropout: float = 0.0
    zq_channels: int | None = None  # channels of the conditioning zq = f; null = the feature channels C_d

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
        if self.zq_channels is not None and self.zq_channels <= 0:
            raise ValueError(f"decoder zq_channels must be positive or null, got {self.zq_channels}")


class SpatialNorm(nn.Module):
    """GN(h) * conv_y(zq') + conv_b(zq'), zq' = zq resized (nearest) to h's spatial size."""

    def __init__(self, channels: int, zq_channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(NUM_GROUPS, channels, eps=1e-6, affine=False)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, h: Tensor, zq: Tensor) -> Tensor:
        if zq.shape[-2:] != h.shape[-2:]:
            zq = F.interpolate(zq, size=h.shape[-2:], mode="nearest")  # (B, C_zq, H, W)
        return self.norm(h) * self.conv_y(zq) + self.conv_b(zq)


class ResBlock(nn.Module):
    """SN + swish + conv3x3, SN + swish + dropout + conv3x3, plus a (1x1-projected) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, zq_ch: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = SpatialNorm(in_ch, zq_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = SpatialNorm(out_ch, zq_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, zq: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)))  # (B, out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h, zq))))  # (B, out, H, W)
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (SpatialNorm first), residual."""

    def __init__(self, channels: int, zq_ch: int) -> None:
        super().__init__()
        self.norm = SpatialNorm(channels, zq_ch)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, zq: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x, zq)
        # (B, C, H, W) -> (B, 1, HW, C): one head of width C; softmax(q k^T / sqrt(C)) v
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(y), self.k(y), self.v(y)))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    """Nearest x2, then conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ResBlocks (each optionally followed by attention), then optionally x2 up."""

    def __init__(
        self, in_ch: int, out_ch: int, zq_ch: int, n_blocks: int, attn: bool, upsample: bool, dropout: float
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            [ResBlock(in_ch if i == 0 else out_ch, out_ch, zq_ch, dropout) for i in range(n_blocks)]
        )
        self.attn = nn.ModuleList([AttnBlock(out_ch, zq_ch) for _ in range(n_blocks)] if attn else [])
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, x: Tensor, zq: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x, zq)
            if len(self.attn):
                x = self.attn[i](x, zq)
        return self.upsample(x) if self.upsample is not None else x


@DECODERS.register("movq")
class MoVQDecoder(nn.Module):
    """The MoVQ decoder driven by (and conditioned on) the feature block f."""

    Config = MoVQDecoderConfig

    def __init__(
        self,
        cfg: MoVQDecoderConfig,
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
        zq_ch = in_channels if cfg.zq_channels is None else cfg.zq_channels
        if zq_ch != in_channels:
            raise ValueError(
                f"decoder zq_channels ({cfg.zq_channels}) must equal the feature channels ({in_channels}): "
                f"the SpatialNorms are conditioned on the decoder input f; set it to null"
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
        self.mid = nn.ModuleList(
            [
                ResBlock(block_in, block_in, zq_ch, cfg.dropout),
                AttnBlock(block_in, zq_ch),
                ResBlock(block_in, block_in, zq_ch, cfg.dropout),
            ]
        )
        levels, res = [], in_resolution
        for i in reversed(range(len(chans))):  # lowest resolution first
            attn = res in cfg.attn_resolutions
            levels.append(Level(block_in, chans[i], zq_ch, cfg.num_res_blocks + 1, attn, i != 0, cfg.dropout))
            block_in = chans[i]
            res = res * 2 if i != 0 else res
        self.up = nn.ModuleList(levels)
        self.norm_out = SpatialNorm(block_in, zq_ch)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, f: Tensor) -> Tensor:
        if f.ndim != 4 or f.shape[1] != self.in_channels or f.shape[2:] != (self.in_resolution, self.in_resolution):
            raise ValueError(
                f"decoder expects features (B, {self.in_channels}, {self.in_resolution}, {self.in_resolution}), "
                f"got {tuple(f.shape)}"
            )
        # channels_last: oneDNN's native layout on CPU, where it makes these convs ~1.3x faster (and
        # cuDNN's on tensor cores); every layer here keeps the layout. The output is plain NCHW.
        f = f.contiguous(memory_format=torch.channels_last)
        zq = f  # the conditioning of every SpatialNorm: (B, C_d, H_d, W_d), resized per resolution
        h = self.conv_in(f)  # (B, ch * ch_mult[-1], H_d, W_d)
        for layer in self.mid:
            h = layer(h, zq)
        for level in self.up:
            h = level(h, zq)
        return self.conv_out(F.silu(self.norm_out(h, zq))).contiguous()  # (B, out_channels, R, R)


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
