"""Image encoder E: x -> key-code logits (paper Sec. 3.1, Suppl. A.1 and A.4).

The paper's encoder "follows the design of VQ-GAN" (Esser et al., taming-transformers; the same
encoder is reused by latent diffusion), with the unit channel set to 32 and self-attention at the
code resolution min(H_z, W_z) (Suppl. A.1). This module is that design, written afresh:

    conv_in 3x3
    for each level i (channels = channels * ch_mult[i]):
        num_res_blocks x [ResnetBlock, AttnBlock if the current resolution is in attn_resolutions]
        Downsample (pad right/bottom by 1, 3x3 stride-2 conv) while fewer than n_down are done
    mid (if mid_block): ResnetBlock, AttnBlock (if mid_attention), ResnetBlock
    GroupNorm, activation, conv_out 3x3 -> out_channels

n_down = log2(resolution / code_resolution). The encoder returns *logits*: the autoencoder
appends the sigmoid that puts z in [0, 1] (Sec. 3.1), or, for the KL variant (Suppl. A.4), asks
for 2 * C_z channels and splits them into (mu, logvar) before z = sigmoid(mu + sigma * eps).

The authors' code (REFERENCES Sec. 8; `training/encoder.py` of their StyleGAN3 fork, which
brics_code_release imports) departs from VQGAN in three ways. (1) It never runs the mid block (the
call is commented out of `forward`): their ~3.47M parameters leave it out, while VQGAN's mid block
at 256 channels alone adds 2.63M. The paper is the default (`mid_block: true`, VQGAN's layout,
6.14M parameters); `mid_block: false` reproduces the authors' trained encoder (3.51M). (2) Leaky ReLU (`activation: leaky_relu`) instead
of swish (the default here). (3) A 1x1 conv_out where VQGAN, and this module, use 3x3 (8k
parameters at 256 channels). Their level widths are
ch * 2^(i+1) = 64, 128, 256 (`ch_mult: [2, 4, 8]`); brics' default [1, 2, 4, 8] adds a 32-channel
level at full resolution and lands within 2% of their parameter count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

# Slope of the leaky ReLU option: the authors' encoder calls F.leaky_relu with its default, 0.01.
LEAKY_SLOPE = 0.01


@dataclass
class EncoderConfig:
    channels: int = 32  # unit channel (paper Suppl. A.1: 32)
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    num_res_blocks: int = 2
    attn_resolutions: list[int] | None = None  # None = [min(H_z, W_z)] (paper Suppl. A.1)
    mid_block: bool = True  # VQGAN (paper); the authors' trained encoder skips it (see module doc)
    mid_attention: bool = True  # attention between the two mid res blocks, when mid_block
    dropout: float = 0.0
    activation: Literal["silu", "leaky_relu"] = "silu"  # VQGAN: swish; the authors' code: leaky ReLU

    def validate(self) -> None:
        if self.channels <= 0:
            raise ValueError(f"channels must be positive, got {self.channels}")
        if not self.ch_mult:
            raise ValueError("ch_mult must have at least one multiplier, e.g. [1, 2, 4, 8]")
        if any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"every ch_mult entry must be positive, got {self.ch_mult}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.attn_resolutions is not None and any(r <= 0 for r in self.attn_resolutions):
            raise ValueError(f"attn_resolutions must be positive, got {self.attn_resolutions}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ("silu", "leaky_relu"):
            raise ValueError(f"activation must be 'silu' or 'leaky_relu', got {self.activation!r}")


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

    `ch_mult` shorter than n_down + 1 is extended by repeating its last multiplier (256 -> 16x16
    codes needs 5 levels: [1, 2, 4, 8] becomes [1, 2, 4, 8, 8]). A longer one keeps its extra
    levels at the code resolution without downsampling: the default at 256 -> 64 runs levels of
    32, 64, 128, 256 channels at 256, 128, 64, 64 pixels.
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
        mults = list(cfg.ch_mult)
        mults += [mults[-1]] * (self.n_down + 1 - len(mults))
        self.ch_mult = mults
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
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, channels, R, R)
        for level in self.down:
            for block, attn in zip(level.block, level.attn):
                h = attn(block(h))
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # (B, C_i, H/2, W/2)
        h = self.mid(h)  # (B, C_last, H_z, W_z); empty unless mid_block
        return self.conv_out(self.act(self.norm_out(h)))  # (B, out_channels, H_z, W_z) logits
