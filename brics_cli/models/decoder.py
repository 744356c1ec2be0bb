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

Difference from the released code: there the style is computed per key-code group (64-d pooled
raw features -> 3-layer mapping -> 128, four groups concatenated); here one mapping MLP takes the
pooled decoder input C_d -> C_d, so the decoder depends on nothing but f (plugins share that
signature) -- 787,968 mapping parameters at C_d = 512.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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

    def validate(self) -> None:
        if self.channel_base <= 0 or self.channel_max <= 0:
            raise ValueError(
                f"decoder channel_base and channel_max must be positive, got {self.channel_base} and {self.channel_max}"
            )
        if self.mapping_layers < 0:
            raise ValueError(f"decoder mapping_layers must be >= 0, got {self.mapping_layers}")
        if not self.mapping_lr_mul > 0:
            raise ValueError(f"decoder mapping_lr_mul must be positive, got {self.mapping_lr_mul}")

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
    ) -> None:
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
        # lr_mul 0.01 (StyleGAN): the mapping learns 100x slower, which keeps the styles stable.
        self.mapping = nn.Sequential(
            *[
                EqualLinear(style_dim, style_dim, lr_mul=cfg.mapping_lr_mul, activation="lrelu")
                for _ in range(cfg.mapping_layers)
            ]
        )
        blocks, prev_ch = [], in_channels
        for i, r in enumerate(resolutions):
            block = SynthesisBlock(prev_ch, cfg.channels(r), style_dim, out_channels, first=i == 0, noise=cfg.noise)
            blocks.append(block)
            prev_ch = cfg.channels(r)
        self.blocks = nn.ModuleList(blocks)

    def style(self, f: Tensor) -> Tensor:
        """f (B, C_d, H_d, W_d) -> w (B, C_d): pooled, RMS-normalised, mapped."""
        s = f.mean(dim=(2, 3))  # (B, C_d)
        # RMS ("pixel") normalisation as on StyleGAN's z: the mapping sees unit-RMS input whatever f's scale.
        s = s * torch.rsqrt(s.square().mean(dim=1, keepdim=True) + 1e-8)  # (B, C_d)
        return self.mapping(s)  # (B, C_d)

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
