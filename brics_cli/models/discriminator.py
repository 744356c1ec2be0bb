"""StyleGAN2 residual discriminator, used by the autoencoder's adversarial loss (paper Sec. 3.3).

Karras et al. 2020 (StyleGAN2), Fig. 7c "residual" discriminator, as in the authors' released
code (REFERENCES Sec. 8: 28.9M parameters at 256x256):

    fromRGB 1x1 conv + lrelu                                   (B, ch(R), R, R)
    for r = R, R/2, ..., 8: residual block r -> r/2
        main: conv 3x3 ch(r) -> ch(r), lrelu; blur + conv 3x3 stride 2 ch(r) -> ch(r/2), lrelu
        skip: blur + conv 1x1 stride 2 ch(r) -> ch(r/2), no bias, no activation
        out = (main + skip) / sqrt(2)
    epilogue at 4x4: minibatch stddev, conv 3x3 + lrelu, flatten, linear -> ch(4) + lrelu, linear -> 1

ch(r) = min(channel_max, channel_base // r); every layer uses the equalised learning rate and
lrelu means leaky ReLU 0.2 times sqrt(2). Scores are raw (no sigmoid): the WGAN-GP and logistic
losses take them as they are. Pure PyTorch, so double backward (the gradient penalty) works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from brics_cli.models.layers import DownConv2d, EqualConv2d, EqualLinear, lrelu_gain


@dataclass
class DiscriminatorConfig:
    channel_base: int = 32768  # channels at resolution r = min(channel_max, channel_base // r)
    channel_max: int = 512
    mbstd_group: int = 4  # samples per minibatch-stddev group
    mbstd_channels: int = 1  # feature groups in the minibatch stddev (channels it appends)

    def validate(self) -> None:
        if self.channel_base <= 0 or self.channel_max <= 0:
            raise ValueError(
                f"discriminator channel_base and channel_max must be positive, got "
                f"{self.channel_base} and {self.channel_max}"
            )
        if self.mbstd_group < 1:
            raise ValueError(f"discriminator mbstd_group must be >= 1, got {self.mbstd_group}")
        if self.mbstd_channels < 0:
            raise ValueError(f"discriminator mbstd_channels must be >= 0 (0 turns it off), got {self.mbstd_channels}")

    def channels(self, resolution: int) -> int:
        """ch(r) = min(channel_max, channel_base // r)."""
        return min(self.channel_max, self.channel_base // resolution)


class ConvLrelu(nn.Module):
    """EqualConv2d (same padding) + bias + lrelu(0.2) * sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int) -> None:
        super().__init__()
        self.conv = EqualConv2d(in_ch, out_ch, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        return lrelu_gain(self.conv(x))


class ResidualBlock(nn.Module):
    """r -> r/2: two 3x3 convs (the second down-sampling) plus a 1x1 down-sampling skip."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv0 = ConvLrelu(in_ch, in_ch, 3)
        self.conv1 = DownConv2d(in_ch, out_ch, 3)
        self.skip = DownConv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = lrelu_gain(self.conv1(self.conv0(x)))  # (B, out, r/2, r/2)
        # 1/sqrt(2) keeps the variance of the sum equal to that of each branch.
        return (y + self.skip(x)) / math.sqrt(2.0)


def minibatch_stddev(x: Tensor, group: int, channels: int) -> Tensor:
    """Append `channels` maps holding the within-group feature stddev (Karras et al. 2018, Sec. 3).

    (B, C, H, W) -> (B, C + channels, H, W). Letting D see batch statistics lets it penalise a
    generator whose outputs lack variety. Samples are split into groups of G = the largest divisor
    of B that is <= `group`, so any batch size works: B = 6 with group 4 uses G = 3; a prime B
    larger than `group` falls back to G = 1, where the statistic is a constant (uninformative, harmless).
    """
    B, C, H, W = x.shape
    G = max(g for g in range(1, min(group, B) + 1) if B % g == 0)
    F_ = channels
    y = x.reshape(G, B // G, F_, C // F_, H, W)  # (G, M, F, C/F, H, W); sample b sits in group b % M
    y = y - y.mean(dim=0)  # deviation from the group mean
    y = (y.square().mean(dim=0) + 1e-8).sqrt()  # (M, F, C/F, H, W) stddev over the group
    y = y.mean(dim=(2, 3, 4))  # (M, F) averaged over channels and pixels
    y = y.reshape(-1, F_, 1, 1).repeat(G, 1, H, W)  # (B, F, H, W) back to every sample of the group
    return torch.cat([x, y], dim=1)  # (B, C + F, H, W)


class Discriminator(nn.Module):
    """StyleGAN2 ResNet discriminator: image (B, C, R, R) -> scores (B,)."""

    def __init__(self, cfg: DiscriminatorConfig, resolution: int, in_channels: int = 3) -> None:
        super().__init__()
        cfg.validate()
        n_blocks = round(math.log2(resolution)) - 2 if resolution >= 4 else -1
        if n_blocks < 0 or 2 ** (n_blocks + 2) != resolution:
            raise ValueError(f"discriminator resolution must be a power of two >= 4, got {resolution}")
        resolutions = [resolution // 2**i for i in range(n_blocks + 1)]  # R, R/2, ..., 4
        if any(cfg.channels(r) < 1 for r in resolutions):
            raise ValueError(
                f"discriminator channel_base {cfg.channel_base} gives 0 channels at resolution {resolution}; "
                f"raise channel_base to at least {resolution}"
            )
        ch4 = cfg.channels(4)
        if cfg.mbstd_channels and ch4 % cfg.mbstd_channels:
            raise ValueError(
                f"discriminator mbstd_channels ({cfg.mbstd_channels}) must divide the 4x4 channel count ({ch4})"
            )
        self.cfg = cfg
        self.resolution, self.in_channels = resolution, in_channels
        self.from_rgb = ConvLrelu(in_channels, cfg.channels(resolution), 1)
        self.blocks = nn.Sequential(*[ResidualBlock(cfg.channels(r), cfg.channels(r // 2)) for r in resolutions[:-1]])
        self.conv = ConvLrelu(ch4 + cfg.mbstd_channels, ch4, 3)
        self.fc = EqualLinear(ch4 * 4 * 4, ch4, activation="lrelu")
        self.out = EqualLinear(ch4, 1)

    def forward(self, img: Tensor) -> Tensor:
        if img.ndim != 4 or img.shape[1:] != (self.in_channels, self.resolution, self.resolution):
            raise ValueError(
                f"discriminator expects images (B, {self.in_channels}, {self.resolution}, {self.resolution}), "
                f"got {tuple(img.shape)}"
            )
        x = self.from_rgb(img)  # (B, ch(R), R, R)
        x = self.blocks(x)  # (B, ch(4), 4, 4)
        if self.cfg.mbstd_channels:
            x = minibatch_stddev(x, self.cfg.mbstd_group, self.cfg.mbstd_channels)  # (B, ch(4) + F, 4, 4)
        x = self.conv(x)  # (B, ch(4), 4, 4)
        x = self.fc(x.flatten(1))  # (B, ch(4))
        return self.out(x).squeeze(1)  # (B,)
