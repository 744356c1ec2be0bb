"""Autoencoder optimisers (paper Suppl. A.2).

Adam with lr 2e-3 and betas (0, 0.99) for everything; eps 1e-15 for the encoder, grids, F_mlp and
decoder -- tiny so that rarely-hit grid entries still get full-size updates (Instant-NGP) -- and
eps 1e-8 for the discriminator.

`grid_lr` (default: `lr`, the paper) gives the feature-grid tables their own learning rate, as
Instant-NGP trains its hash tables at 1e-2: every table row is touched by few queries per step, so
a larger step size lets them catch up with the dense weights (used by `recipes/demo.yaml`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AEOptimConfig:
    lr: float = 2e-3
    betas: tuple[float, float] = (0.0, 0.99)
    eps: float = 1e-15  # generator side: encoder, grids, F_mlp, decoder
    d_lr: float = 2e-3
    d_eps: float = 1e-8  # discriminator
    grid_lr: float | None = None  # feature-grid tables; None: lr (the paper)

    def validate(self) -> None:
        if self.lr <= 0 or self.d_lr <= 0 or (self.grid_lr is not None and self.grid_lr <= 0):
            raise ValueError("ae.optim.lr, ae.optim.d_lr and ae.optim.grid_lr must be > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"ae.optim.betas must lie in [0, 1), got {list(self.betas)}")


def build_optimizers(
    cfg: AEOptimConfig, generator: nn.Module, discriminator: nn.Module
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """(G optimiser over the whole autoencoder, D optimiser) with the paper's separate eps.

    G has two parameter groups, always in this order: everything but the grid tables at `lr`, then
    the tables (parameters named `*.grids.*`) at `grid_lr`."""
    named = list(generator.named_parameters())
    tables = [p for n, p in named if ".grids." in f".{n}"]
    rest = [p for n, p in named if ".grids." not in f".{n}"]
    grid_lr = cfg.lr if cfg.grid_lr is None else cfg.grid_lr
    g_opt = torch.optim.Adam(
        [{"params": rest}, {"params": tables, "lr": grid_lr}], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps
    )
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=cfg.d_lr, betas=cfg.betas, eps=cfg.d_eps)
    return g_opt, d_opt
