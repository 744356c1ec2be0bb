"""Key codes: tiling, relaxed-precision noise and spatial coordinates (paper Sec. 3.2, Eq. 1, Sec. 3.4).

z (B, C_z, H_z, W_z) in [0,1] is tiled to z_hat (B, C_z, H_d, W_d), split into N_h = C_z / C_key slices
of C_key channels, perturbed by eps ~ N(0, (1 / (4 r_max))^2) while the autoencoder trains, and each
slice is concatenated with the normalised pixel-centre coordinates of its position:
q_{i,j}^s = [z_hat_{i,j}^s + eps; x; y] in [0,1]^{C_key + 2}.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Tiling = Literal["interleaved", "whole"]


def tile_key_codes(z: Tensor, size: tuple[int, int], mode: Tiling = "interleaved") -> Tensor:
    """(B, C, H_z, W_z) -> (B, C, H_d, W_d), H_d = s * H_z.

    `interleaved` (paper, authors' code): each code fills an s x s block (nearest-neighbour repeat).
    `whole`: the whole H_z x W_z map is repeated s x s times side by side.
    """
    H_d, W_d = size
    H_z, W_z = z.shape[-2:]
    if H_d % H_z or W_d % W_z:
        raise ValueError(f"feature block {H_d}x{W_d} is not a whole multiple of the key code {H_z}x{W_z}")
    s_h, s_w = H_d // H_z, W_d // W_z
    if mode == "interleaved":
        return z.repeat_interleave(s_h, dim=-2).repeat_interleave(s_w, dim=-1)
    if mode == "whole":
        return z.repeat(1, 1, s_h, s_w)
    raise ValueError(f"unknown tiling '{mode}' (interleaved | whole)")


def relaxed_precision_noise(z: Tensor, r_max: float, generator: torch.Generator | None = None) -> Tensor:
    """z + eps, eps ~ N(0, (1/(4 r_max))^2), clipped to [0,1] (Sec. 3.4). Call only while training the AE."""
    eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return (z + eps / (4 * r_max)).clamp(0, 1)


def pixel_centre_coords(H: int, W: int, device=None, dtype=torch.float32) -> Tensor:
    """(2, H, W): x = (j + 0.5) / W along columns, y = (i + 0.5) / H along rows, both in (0, 1)."""
    y = (torch.arange(H, device=device, dtype=dtype) + 0.5) / H
    x = (torch.arange(W, device=device, dtype=dtype) + 0.5) / W
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([xx, yy])


def key_queries(z_hat: Tensor, key_channels: int) -> Tensor:
    """Tiled codes (B, C_z, H_d, W_d) -> queries q (N_h, B * H_d * W_d, C_key + 2), Eq. 1.

    Groups are contiguous channel chunks: group s holds channels [s C_key, (s + 1) C_key).
    """
    B, C_z, H, W = z_hat.shape
    N_h = C_z // key_channels
    keys = z_hat.view(B, N_h, key_channels, H, W)
    coords = pixel_centre_coords(H, W, z_hat.device, z_hat.dtype).expand(B, N_h, 2, H, W)
    q = torch.cat([keys, coords], dim=2)  # (B, N_h, C_key + 2, H, W)
    return q.permute(1, 0, 3, 4, 2).reshape(N_h, B * H * W, key_channels + 2)
