"""The diffusion UNet on key codes, after LDM (paper Sec. 4 and Suppl. A.5; REFERENCES Sec. 5).

Rombach et al. 2022's `openaimodel.UNetModel` (itself Dhariwal & Nichol's ADM) without the parts
the paper does not use: an epsilon-predicting UNet with channel multipliers (1, 2, 3, 4), 2
residual blocks per resolution, self-attention at code resolutions 32, 16, 8 (for a 64x64 code) and
in the middle, GroupNorm(32) everywhere, no class conditioning. Per level of resolution r:

    down:  num_res_blocks x [ResBlock (+ Attention if r in attention_resolutions)], then conv stride 2
    mid:   ResBlock, Attention, ResBlock
    up:    (num_res_blocks + 1) x [concat skip, ResBlock (+ Attention)], then nearest x2 + conv

Noise-level conditioning: the model takes logSNR(t), not t (as the authors' imagen-pytorch UNet,
REFERENCES Sec. 8). The network then sees the noise level itself, whatever schedule or time
discretisation produced it: a model trained with one schedule stays valid for a sampler that walks
another grid of noise levels, and configs (a) and (b) train the same function. logSNR lies in
[-20.7, 20.7] (the schedules' clipping); it is scaled by 1000 / (2 * 20.7) before the usual
transformer sinusoid, whose frequencies (1 down to 1e-4) were made for positions spanning ~1000.

Written for speed in pure PyTorch: one 1x1 convolution computes q, k and v together, and attention
is `F.scaled_dot_product_attention` (flash / memory-efficient kernels where available). No batch
statistics anywhere (GroupNorm is per sample), so sample i's output does not depend on the other
samples in its batch beyond floating-point kernel choices.
"""

from __future__ import annotations

from typing import NamedTuple

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The noise levels the UNet is built for. Every schedule clips gamma to [1e-9, 1 - 1e-9]
# (brics_cli/diffusion/schedules.py: GAMMA_MIN, GAMMA_MAX), so |logSNR| <= 20.72; computed the same
# way as there (tests/test_diffusion.py checks that the two agree).
_GAMMA_MAX = 1.0 - 1e-9
LOGSNR_MAX = math.log(_GAMMA_MAX / (1.0 - _GAMMA_MAX))
LOGSNR_EMBED_SCALE = 1000.0 / (2.0 * LOGSNR_MAX)  # logSNR in [-20.7, 20.7] -> positions in [-500, 500]


@dataclass
class UNetConfig:
    model_channels: int = 256  # "unit channel size 256" (Sec. 4)
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)  # Suppl. A.5
    num_res_blocks: int = 2
    # Code resolutions (H_z of that level) with self-attention. null: every level below the top --
    # the authors' "attention at the 3 lower levels" (Suppl. A.5), i.e. (32, 16, 8) for 64x64 codes
    # and (8, 4, 2) for 16x16 ones, so the UNet follows the code size of the AE it is trained on.
    attention_resolutions: tuple[int, ...] | None = None
    num_head_channels: int | None = 32  # channels per head (LDM's FFHQ config); null -> use num_heads
    num_heads: int | None = None  # a fixed number of heads instead
    dropout: float = 0.0
    norm_groups: int = 32

    def validate(self) -> None:
        if self.model_channels < 1 or not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError("diffusion.model.model_channels and every channel_mult must be >= 1")
        if self.num_res_blocks < 1:
            raise ValueError(f"diffusion.model.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if (self.num_head_channels is None) == (self.num_heads is None):
            raise ValueError("set exactly one of diffusion.model.num_head_channels and diffusion.model.num_heads (the other null)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"diffusion.model.dropout must lie in [0, 1), got {self.dropout}")
        for ch in self.level_channels():
            if ch % self.norm_groups:
                raise ValueError(
                    f"diffusion.model: {ch} channels are not divisible by norm_groups = {self.norm_groups}"
                )
            heads_ok = ch % self.num_head_channels == 0 if self.num_head_channels else ch % self.num_heads == 0
            if not heads_ok:
                raise ValueError(f"diffusion.model: {ch} channels do not split into the attention heads asked for")

    def level_channels(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    def level_resolutions(self, resolution: int) -> list[int]:
        """The code resolution at each level: resolution, resolution / 2, ..."""
        return [resolution // 2**i for i in range(len(self.channel_mult))]

    def attention_at(self, resolution: int) -> tuple[int, ...]:
        """The attention resolutions for codes of `resolution`: as set, or derived (see the field)."""
        if self.attention_resolutions is not None:
            return tuple(self.attention_resolutions)
        return tuple(self.level_resolutions(resolution)[1:])

    def check_resolution(self, resolution: int) -> None:
        """The code resolution must halve cleanly at every level and contain every attention resolution."""
        levels = len(self.channel_mult)
        if resolution % 2 ** (levels - 1):
            raise ValueError(
                f"a {resolution}x{resolution} code cannot be halved {levels - 1} times (diffusion.model.channel_mult has {levels} levels)"
            )
        missing = sorted(set(self.attention_at(resolution)) - set(self.level_resolutions(resolution)))
        if missing:
            raise ValueError(
                f"diffusion.model.attention_resolutions {missing} are not among the UNet's code resolutions "
                f"{self.level_resolutions(resolution)} for a {resolution}x{resolution} code"
            )


def logsnr_embedding(logsnr: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos, sin] of the scaled logSNR: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=logsnr.device) / half)
    args = (logsnr.float() * LOGSNR_EMBED_SCALE)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialised output layers: every residual branch starts as the identity (ADM / LDM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class NoiseEmbedding(NamedTuple):
    """The noise-level embedding of each *distinct* logSNR in the batch, and each sample's row.

    During sampling every sample shares one noise level, so every Linear on the embedding runs on
    one row whatever the batch size: a sample's output is then bitwise independent of the batch
    (BLAS kernels chosen by the row count M can round differently). `brics sample` relies on this.
    """

    values: Tensor  # (U, D)
    rows: Tensor  # (B,) index into values


class ResBlock(nn.Module):
    """GN-SiLU-conv3x3, + Linear(SiLU(emb)) per channel, GN-SiLU-dropout-conv3x3; 1x1 skip when channels change."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: NoiseEmbedding) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = h + self.emb(emb.values)[emb.rows][:, :, None, None]  # values are SiLU'd once in UNet.forward
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H x W positions: GN, fused QKV (one 1x1 conv), SDPA, 1x1 out."""

    def __init__(self, ch: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        d = C // self.heads
        # The 1x1 convs run as matmuls on (B, HW, C) rows, so q, k and v come out with the head
        # dimension contiguous: that is what SDPA's fused (flash) kernels need; with the
        # (B, heads, d, HW) -> transpose layout it falls back to bmm + softmax, ~3x slower on CPU.
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = F.linear(h, self.qkv.weight.view(3 * C, C), self.qkv.bias)  # (B, HW, 3C)
        q, k, v = qkv.view(B, H * W, 3, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, d)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)  # (B, HW, C)
        h = F.linear(h, self.out.weight.view(C, C), self.out.bias)  # (B, HW, C)
        return x + h.transpose(1, 2).view(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """One ResBlock and, at attention resolutions, one Attention after it."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, cfg: UNetConfig, attention: bool) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, cfg.dropout, cfg.norm_groups)
        heads = out_ch // cfg.num_head_channels if cfg.num_head_channels else cfg.num_heads
        self.attn = Attention(out_ch, heads, cfg.norm_groups) if attention else None

    def forward(self, x: Tensor, emb: NoiseEmbedding) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """eps_theta(x_t, logSNR): (B, C, R, R), (B,) -> (B, C, R, R), for codes of `channels` x R x R."""

    def __init__(self, cfg: UNetConfig, channels: int, resolution: int) -> None:
        super().__init__()
        cfg.check_resolution(resolution)
        self.cfg, self.channels, self.resolution = cfg, channels, resolution
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        self.embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(channels, mc, 3, padding=1)

        level_ch = cfg.level_channels()
        attn_at = [r in cfg.attention_at(resolution) for r in cfg.level_resolutions(resolution)]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, ch = [mc], mc  # channels of every skip connection, in order
        for level, out_ch in enumerate(level_ch):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Stage(ch, out_ch, emb_dim, cfg, attn_at[level]))
                ch = out_ch
                skips.append(ch)
            if level < len(level_ch) - 1:
                self.downsample.append(Downsample(ch))
                skips.append(ch)

        self.mid_res1 = ResBlock(ch, ch, emb_dim, cfg.dropout, cfg.norm_groups)
        mid_heads = ch // cfg.num_head_channels if cfg.num_head_channels else cfg.num_heads
        self.mid_attn = Attention(ch, mid_heads, cfg.norm_groups)
        self.mid_res2 = ResBlock(ch, ch, emb_dim, cfg.dropout, cfg.norm_groups)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(level_ch))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(Stage(ch + skips.pop(), level_ch[level], emb_dim, cfg, attn_at[level]))
                ch = level_ch[level]
            if level > 0:
                self.upsample.append(Upsample(ch))

        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch)
        self.conv_out = _zero(nn.Conv2d(ch, channels, 3, padding=1))

    def forward(self, x: Tensor, logsnr: Tensor) -> Tensor:
        n, levels = self.cfg.num_res_blocks, len(self.cfg.channel_mult)
        if logsnr.is_meta:  # shape-only runs (`brics info`): unique() has no meta kernel
            levels_u, rows = logsnr, torch.arange(logsnr.shape[0], device=logsnr.device)
        else:
            levels_u, rows = torch.unique(logsnr, return_inverse=True)
        emb = NoiseEmbedding(F.silu(self.embed(logsnr_embedding(levels_u, self.cfg.model_channels))), rows)  # (U, 4 mc)
        h = self.conv_in(x)  # (B, mc, R, R)
        skips = [h]
        for level in range(levels):
            for stage in self.down[level * n : (level + 1) * n]:
                h = stage(h, emb)
                skips.append(h)
            if level < levels - 1:
                h = self.downsample[level](h)  # (B, ch, R / 2^(level+1), ...)
                skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)
        for i, level in enumerate(reversed(range(levels))):
            for stage in self.up[i * (n + 1) : (i + 1) * (n + 1)]:
                h = stage(torch.cat([h, skips.pop()], dim=1), emb)
            if level > 0:
                h = self.upsample[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, R, R)
