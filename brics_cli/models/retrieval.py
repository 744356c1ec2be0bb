"""Feature retrieval: groups of multi-resolution grids followed by F_mlp (paper Sec. 3.2, Eq. 2, Fig. 9).

f_{i,j}^s = F_mlp(F_inp(F_r(q_{i,j}^s))): each of the N_h groups interpolates an N_r * C_v feature from
its own grid and maps it with its own small MLP to C_d / N_h channels; groups are concatenated in
order into the feature block f (B, C_d, H_d, W_d) that the decoder consumes.

F_mlp (Suppl. B: two (C_v N_r)^2 layers and one C_v N_r -> C_d / N_h layer) runs for all groups at
once as batched matrix products. `modulated: true` is the authors' code variant: every layer's input
is scaled by a style computed from the group's average-pooled raw retrieved features, then
demodulated (StyleGAN2 style).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brics_cli.models.grid import GridConfig, MultiResolutionGrids
from brics_cli.models.keycode import key_queries
from brics_cli.models.separable import PixelGridInterpolate, prefer_separable


@dataclass
class MLPConfig:
    hidden: int = 64  # paper: C_v * N_r
    layers: int = 3  # linear layers: in -> hidden -> hidden -> C_d / N_h
    negative_slope: float = 0.01  # leaky ReLU between layers (authors' code)
    modulated: bool = False  # authors' code: style-modulated layers

    def validate(self) -> None:
        if self.layers < 1 or self.hidden < 1:
            raise ValueError(f"ae.mlp.layers and ae.mlp.hidden must be >= 1, got {self.layers}, {self.hidden}")


class GroupedLinear(nn.Module):
    """N_h independent linear layers applied to (N_h, ..., in) in one batched matmul."""

    def __init__(self, groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default initialisation, per group
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:  # (G, N, in) -> (G, N, out)
        return torch.baddbmm(self.bias, x, self.weight)


class GroupedMLP(nn.Module):
    """F_mlp for all groups: (G, N, in) -> (G, N, out), optionally style-modulated per sample."""

    def __init__(self, cfg: MLPConfig, groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.cfg = cfg
        sizes = [in_features] + [cfg.hidden] * (cfg.layers - 1) + [out_features]
        self.layers = nn.ModuleList(GroupedLinear(groups, a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        if cfg.modulated:
            # One affine per layer: raw pooled features (G, B, in_features) -> input-channel scales.
            self.affines = nn.ModuleList(GroupedLinear(groups, in_features, a) for a in sizes[:-1])
            for affine in self.affines:
                nn.init.ones_(affine.bias)  # start as the identity modulation

    def forward(self, h: Tensor, batch: int, channels_first: bool = False) -> Tensor:
        """(G, N, in) -> (G, N, out), or (G, out, N) with `channels_first`."""
        G, N, _ = h.shape
        last = len(self.layers) - 1
        style = h.view(G, batch, N // batch, -1).mean(2) if self.cfg.modulated else None  # (G, B, in)
        for i, layer in enumerate(self.layers):
            if style is not None:
                s = self.affines[i](style)  # (G, B, in)
                # Demodulate: rsqrt of sum_in (w * s)^2 per (group, sample, out channel).
                demod = torch.rsqrt(torch.bmm(s.square(), layer.weight.square()) + 1e-8)  # (G, B, out)
                h = h.view(G, batch, N // batch, -1) * s.unsqueeze(2)
                h = torch.bmm(h.flatten(1, 2), layer.weight).view(G, batch, N // batch, -1)
                h = (h * demod.unsqueeze(2)).flatten(1, 2) + layer.bias
            elif i == last and channels_first:
                # W^T h^T: the transposed product comes out channel-major without a copy.
                return torch.baddbmm(layer.bias.transpose(1, 2), layer.weight.transpose(1, 2), h.transpose(1, 2))
            else:
                h = layer(h)
            if i < last:
                h = F.leaky_relu(h, self.cfg.negative_slope)
        return h.transpose(1, 2) if channels_first else h


class FeatureRetrieval(nn.Module):
    """Tiled key codes z_hat (B, C_z, H_d, W_d) -> feature block f (B, C_d, H_d, W_d)."""

    def __init__(self, grid: GridConfig, mlp: MLPConfig, groups: int, key_channels: int, r_max: float, channels: int):
        super().__init__()
        if channels % groups:
            raise ValueError(f"feature channels C_d = {channels} must be divisible by N_h = {groups} groups")
        self.groups = groups
        self.key_channels = key_channels
        self.interpolation = grid.interpolation
        self.grids = MultiResolutionGrids(grid, groups, key_channels + 2, r_max)
        self.mlp = GroupedMLP(mlp, groups, self.grids.out_features, channels // groups)

    def use_separable(self, batch: int, size: tuple[int, int]) -> bool:
        if self.interpolation != "auto":
            return self.interpolation == "separable"
        if torch.is_grad_enabled() and self.grids.tables.requires_grad:
            return True  # its backward is the cheaper one even at batch 1 (benchmarks/RESULTS.md)
        return prefer_separable(self.grids.layout, batch, size, self.key_channels)

    def retrieve(self, z_hat: Tensor) -> Tensor:
        """F_inp(F_r(q)) for every group and position: (N_h, B * H_d * W_d, N_r * C_v), fp32."""
        B, _, H, W = z_hat.shape
        if not self.use_separable(B, (H, W)):
            return self.grids(key_queries(z_hat, self.key_channels))  # Eq. 1 queries [key; x; y]
        keys = z_hat.view(B, self.groups, self.key_channels, H * W).permute(1, 0, 3, 2)  # (N_h, B, P, C_key)
        with torch.autocast(device_type="cuda" if z_hat.is_cuda else "cpu", enabled=False):
            keys = keys.to(self.grids.tables.dtype)
            raw = PixelGridInterpolate.apply(self.grids.tables, keys, self.grids.levels, self.grids.index_fn, (H, W))
        return raw.reshape(self.groups, B * H * W, -1)

    def forward(self, z_hat: Tensor) -> Tensor:
        B, _, H, W = z_hat.shape
        f = self.mlp(self.retrieve(z_hat), B, channels_first=True)  # (N_h, C_d/N_h, B*H*W)
        return f.view(self.groups, -1, B, H, W).permute(2, 0, 1, 3, 4).reshape(B, -1, H, W)  # groups in order
