"""Decoder D: retrieved feature block f -> image, a StyleGAN2 synthesis network (paper Sec. 3.3).

The paper decodes the bi-level features with a StyleGAN2-style generator whose input is the
feature block f (B, C_d, H_d, W_d) instead of a learned constant, modulated by a style code
computed from f itself. This module follows the authors' released decoder (REFERENCES Sec. 8):

    style:  avg-pool f -> (B, C_d) -> RMS-normalise -> mapping MLP (lr multiplier 0.01) -> w
    H_d:    2 x [modulated 3x3 conv, noise, bias, lrelu]                        -> ToRGB
    2 H_d:  up-conv 3x3 + 2 x [modulated 3x3 conv], each with noise, bias, lrelu -> ToRGB + up(RGB)
    ...     until the output resolution R
    channels at resolution r: ch(r) = min(channel_max, channel_base // r)

The same w modulates every layer. No tanh: images come out on the [-1, 1] scale, unclamped
(as in StyleGAN2). With C_d = 512, H_d = 64, R = 256 the synthesis part has 9,445,521 parameters,
the authors' count (the paper's Table 3 says 9.9M), and ~67.7 GMAC at batch 1 (REFERENCES Sec. 4).

The style (`style`):

    pooled (default, the paper's description)  avg-pool all of f (C_d) -> one mapping MLP C_d -> C_d:
        787,968 mapping parameters at C_d = 512
    per-group (the authors' released code)      for each key-code group g of the N_h groups, avg-pool
        f's channel chunk g (C_d / N_h), RMS-normalise it, map it by its own MLP C_d / N_h -> C_d / N_h;
        concatenate the N_h styles in group order: 4 x 49,536 = 198,144 parameters at C_d = 512, N_h = 4

f is the concatenation of the groups' F_mlp outputs in group order (models/retrieval.py), so chunk g
of f is exactly group g's retrieved features and style chunk g depends on group g alone. One
difference remains: the authors pool the *raw* 64-d grid output of the group (before F_mlp) and map
it 64 -> 128; this decoder sees only f, so it pools the group's 128 F_mlp channels (128 -> 128).
The autoencoder passes N_h to a decoder whose constructor takes `groups` (this one); other decoder
plugins keep the five-argument signature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brics_cli.models.layers import (
    LRELU_GAIN,
    LRELU_SLOPE,
    EqualLinear,
    ModulatedConv2d,
    NoiseInjection,
    ToRGB,
    lrelu_gain,
)
from brics_cli.registry import DECODERS


@dataclass
class StyleGANDecoderConfig:
    name: str = "stylegan"  # registry name; every decoder config starts with this field
    channel_base: int = 32768  # channels at resolution r = min(channel_max, channel_base // r)
    channel_max: int = 512
    mapping_layers: int = 3
    mapping_lr_mul: float = 0.01
    noise: bool = True  # per-pixel noise injection (StyleGAN2)
    style: Literal["pooled", "per-group"] = "pooled"  # one style from all of f | the authors' per-group styles

    def validate(self) -> None:
        if self.channel_base <= 0 or self.channel_max <= 0:
            raise ValueError(
                f"decoder channel_base and channel_max must be positive, got {self.channel_base} and {self.channel_max}"
            )
        if self.mapping_layers < 0:
            raise ValueError(f"decoder mapping_layers must be >= 0, got {self.mapping_layers}")
        if not self.mapping_lr_mul > 0:
            raise ValueError(f"decoder mapping_lr_mul must be positive, got {self.mapping_lr_mul}")
        if self.style not in ("pooled", "per-group"):
            raise ValueError(f"ae.decoder.style must be 'pooled' or 'per-group', got {self.style!r}")

    def channels(self, resolution: int) -> int:
        """ch(r) = min(channel_max, channel_base // r)."""
        return min(self.channel_max, self.channel_base // resolution)


class StyledConv(nn.Module):
    """Modulated 3x3 conv (optionally 2x up-sampling), then noise, bias, lrelu(0.2) * sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int, style_dim: int, upsample: bool = False, noise: bool = True) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, style_dim, upsample=upsample)
        self.noise = NoiseInjection() if noise else None
        self.bias = nn.Parameter(torch.zeros(1, out_ch, 1, 1))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        x = self.conv(x, w)  # (B, out, H', W')
        if self.noise is not None:
            x = self.noise(x)
        return lrelu_gain(x + self.bias)

    def forward_scaled(self, x: Tensor, scale: Tensor, w: Tensor, inplace: bool) -> tuple[Tensor, Tensor]:
        """Inference form (no autograd, no noise): (x, scale) -> (y, scale') with
        forward(x * scale, w) == y * scale', scale and scale' per (sample, channel), (B, C).

        Modulation scales the activations and one shared-weight conv runs over the batch
        (StyleGAN2-ADA's fused_modconv=False). Demodulation d > 0, bias b and the lrelu gain g
        leave the layer as the next scale, because lrelu(d y + b) g = d g lrelu(y + b / d):
        what is left per pixel is one in-place add and one in-place lrelu. inplace: x may be
        overwritten (it is this decoder's own intermediate, not the caller's tensor).
        """
        conv = self.conv
        s = conv.affine(w)  # (B, in)
        m = (s * scale)[:, :, None, None]
        if inplace:
            x = x.mul_(m)
        else:  # channels-last: oneDNN's native layout on CPU
            x = torch.mul(x, m, out=torch.empty_like(x, memory_format=torch.channels_last))
        y = conv.conv_shared(x)  # (B, out, H', W')
        d = conv.demodulation(s)  # (B, out)
        y.add_((self.bias.view(1, -1) / d)[:, :, None, None])
        return F.leaky_relu_(y, LRELU_SLOPE), d * LRELU_GAIN


class SynthesisBlock(nn.Module):
    """One resolution: (up-conv +) styled convs, then ToRGB added to the up-sampled previous RGB."""

    def __init__(self, in_ch: int, out_ch: int, style_dim: int, out_channels: int, first: bool, noise: bool) -> None:
        super().__init__()
        if first:  # at H_d: 2 convs, no up-sampling
            convs = [StyledConv(in_ch, out_ch, style_dim, noise=noise)]
            convs += [StyledConv(out_ch, out_ch, style_dim, noise=noise)]
        else:  # at 2r: an up-conv, then 2 convs
            convs = [StyledConv(in_ch, out_ch, style_dim, upsample=True, noise=noise)]
            convs += [StyledConv(out_ch, out_ch, style_dim, noise=noise) for _ in range(2)]
        self.convs = nn.ModuleList(convs)
        self.to_rgb = ToRGB(out_ch, style_dim, out_channels)

    def forward(self, x: Tensor, w: Tensor, rgb: Tensor | None) -> tuple[Tensor, Tensor]:
        for conv in self.convs:
            x = conv(x, w)  # (B, out_ch, r, r)
        return x, self.to_rgb(x, w, rgb)  # rgb: (B, out_channels, r, r)


@DECODERS.register("stylegan")
class StyleGANDecoder(nn.Module):
    """StyleGAN2 synthesis network driven by the feature block f (paper Sec. 3.3)."""

    Config = StyleGANDecoderConfig

    def __init__(
        self,
        cfg: StyleGANDecoderConfig,
        in_channels: int,
        in_resolution: int,
        out_resolution: int,
        out_channels: int = 3,
        groups: int = 1,
    ) -> None:
        """groups: N_h, the number of key-code groups f concatenates (used by `style: per-group`)."""
        super().__init__()
        cfg.validate()
        if in_channels <= 0 or out_channels <= 0 or in_resolution <= 0:
            raise ValueError(
                f"decoder in_channels, out_channels and in_resolution must be positive, got "
                f"{in_channels}, {out_channels} and {in_resolution}"
            )
        n_up = _log2_ratio(in_resolution, out_resolution)
        resolutions = [in_resolution * 2**i for i in range(n_up + 1)]
        if any(cfg.channels(r) < 1 for r in resolutions):
            raise ValueError(
                f"decoder channel_base {cfg.channel_base} gives 0 channels at resolution {resolutions[-1]}; "
                f"raise channel_base to at least {resolutions[-1]}"
            )
        self.cfg = cfg
        self.in_channels, self.in_resolution, self.out_resolution = in_channels, in_resolution, out_resolution
        style_dim = in_channels
        if cfg.style == "per-group":
            if groups < 1 or in_channels % groups:
                raise ValueError(
                    f"ae.decoder.style per-group splits the decoder input's {in_channels} channels into "
                    f"{groups} groups: C_d must be a multiple of N_h"
                )
            self.groups = groups
            # One mapping per group, C_d / N_h -> C_d / N_h; `mapping[g]` is group g's.
            self.mapping = nn.ModuleList(
                [_mapping(style_dim // groups, cfg.mapping_layers, cfg.mapping_lr_mul) for _ in range(groups)]
            )
        else:
            self.groups = 1
            self.mapping = _mapping(style_dim, cfg.mapping_layers, cfg.mapping_lr_mul)
        blocks, prev_ch = [], in_channels
        for i, r in enumerate(resolutions):
            block = SynthesisBlock(prev_ch, cfg.channels(r), style_dim, out_channels, first=i == 0, noise=cfg.noise)
            blocks.append(block)
            prev_ch = cfg.channels(r)
        self.blocks = nn.ModuleList(blocks)

    def style(self, f: Tensor) -> Tensor:
        """f (B, C_d, H_d, W_d) -> w (B, C_d): pooled, RMS-normalised, mapped (per group for `per-group`)."""
        s = f.mean(dim=(2, 3))  # (B, C_d)
        if self.cfg.style == "per-group":
            chunks = s.chunk(self.groups, dim=1)  # N_h x (B, C_d / N_h): group g's channels of f
            return torch.cat([mapping(_rms_normalise(c)) for mapping, c in zip(self.mapping, chunks)], dim=1)
        return self.mapping(_rms_normalise(s))  # (B, C_d)

    def forward(self, f: Tensor) -> Tensor:
        if f.ndim != 4 or f.shape[1] != self.in_channels or f.shape[2:] != (self.in_resolution, self.in_resolution):
            raise ValueError(
                f"decoder expects features (B, {self.in_channels}, {self.in_resolution}, {self.in_resolution}), "
                f"got {tuple(f.shape)}"
            )
        w = self.style(f)  # (B, C_d)
        if not self.training and not torch.is_grad_enabled():
            return self._synthesize_inference(f, w)
        return self._synthesize(f, w)

    def _synthesize(self, f: Tensor, w: Tensor) -> Tensor:
        """The training path: block by block, per-sample modulated weights (noise in training mode)."""
        x, rgb = f, None
        for block in self.blocks:
            x, rgb = block(x, w, rgb)  # x: (B, ch(r), r, r), rgb: (B, out_channels, r, r)
        return rgb  # (B, out_channels, R, R)

    def _synthesize_inference(self, f: Tensor, w: Tensor) -> Tensor:
        """The same function as the training path (tests hold them to 1e-5), for eval without autograd.

        Decoding (reconstruct, sample, eval) runs here: channels-last activations, one shared-weight
        conv per layer, each layer's per-channel output scale carried into the next modulation and
        in-place epilogues (StyledConv.forward_scaled). The convolutions and their MACs are the
        training path's; the elementwise passes and fresh buffers around them are mostly gone --
        1.3x faster on CPU (benchmarks/RESULTS.md, Decoders).
        """
        x, scale, rgb = f, torch.ones_like(f[:, :, 0, 0]), None  # the activation is x * scale
        for block in self.blocks:
            for conv in block.convs:
                x, scale = conv.forward_scaled(x, scale, w, inplace=x is not f)
            rgb = block.to_rgb.forward_scaled(x, scale, w, rgb)  # before the next block overwrites x
        return rgb.contiguous()  # (B, out_channels, R, R)


def _mapping(dim: int, layers: int, lr_mul: float) -> nn.Sequential:
    # lr_mul 0.01 (StyleGAN): the mapping learns 100x slower, which keeps the styles stable.
    return nn.Sequential(*[EqualLinear(dim, dim, lr_mul=lr_mul, activation="lrelu") for _ in range(layers)])


def _rms_normalise(s: Tensor) -> Tensor:
    """RMS ("pixel") normalisation as on StyleGAN's z: the mapping sees unit-RMS input whatever f's scale."""
    return s * torch.rsqrt(s.square().mean(dim=1, keepdim=True) + 1e-8)  # (B, C)


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
