"""Multi-resolution feature grids and their retrieval functions (paper Sec. 3.2, Suppl. A.1, K).

Each of the N_h groups owns one multi-resolution grid: N_r levels l = 0..L-1 with resolution
r_l = r_min * b^l, b = exp((ln r_max - ln r_min) / (L - 1)). A query q in [0,1]^d (d = C_key + 2:
key slice, x, y) falls in a cell of each level; its 2^d corners are looked up in the level's table
(Eq. 6 for `grid`, the Instant-NGP XOR hash for `hash`), d-linearly interpolated (Eq. 4) and the
N_r levels concatenated to an N_r * C_v feature.

Conventions (documented in the README):
- Vertices per dimension at level l: R_l + 1 with R_l = ceil(r_l); entries per level
  min(T, (R_l + 1)^d rounded up to a multiple of `round_entries`) as tiny-cuda-nn and the authors'
  code do, so the church recipe has exactly the 18,630,272 grid parameters of Table 3.
- Positions: `position: paper` uses q * r_l with corners floor / floor + 1 (Suppl. A.1);
  `position: ngp` uses q * (r_l - 1) + 0.5 (tiny-cuda-nn and the authors' code).
- All groups live in one (N_h, E, C_v) parameter, all levels of a group concatenated, so one gather
  serves every group, level and corner.

The forward and backward are a custom autograd function with analytic gradients w.r.t. the tables
(scatter-add) and the query coordinates (derivative of the d-linear weights). Letting autograd
differentiate through the 2^d weight products is ~3x slower on CPU (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from brics_cli.registry import RETRIEVALS

# Instant-NGP's primes for the spatial hash (Teschner et al. 2003, Mueller et al. 2022).
HASH_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)


@dataclass
class GridConfig:
    retrieval: str = "grid"  # RETRIEVALS entry: grid (paper Eq. 6) | hash (Suppl. K)
    levels: int = 16  # N_r
    r_min: float = 4.0  # paper text; Table 3's parameter counts need 16 (the authors' code)
    r_max: float | None = None  # None = paper rule: 64 for 64x64 codes, 32 for <= 32x32 codes
    log2_table_size: int = 18  # T = 2^18 entries per level at most
    features: int = 4  # C_v floats per entry
    position: Literal["paper", "ngp"] = "paper"
    round_entries: int = 8  # entries per dense level rounded up to a multiple of this (tiny-cuda-nn)
    init_scale: float = 1e-4  # entries ~ U(-init_scale, init_scale) (Instant-NGP)
    # How the d-linear interpolation runs (same result): `gather` the 2^d corners of every query, or
    # `separable` (models/separable.py: interpolate x, y once per pixel with matrix products, then
    # gather the key corners); `auto` picks the cheaper for the batch at hand.
    interpolation: Literal["auto", "gather", "separable"] = "auto"

    def validate(self) -> None:
        if self.levels < 1:
            raise ValueError(f"ae.grid.levels must be >= 1, got {self.levels}")
        if self.r_min < 1:
            raise ValueError(f"ae.grid.r_min must be >= 1, got {self.r_min}")
        if self.r_max is not None and self.r_max < self.r_min:
            raise ValueError(f"ae.grid.r_max ({self.r_max}) must be >= ae.grid.r_min ({self.r_min})")
        if not 1 <= self.log2_table_size <= 30:
            raise ValueError(f"ae.grid.log2_table_size must be in 1..30, got {self.log2_table_size}")
        if self.features < 1 or self.round_entries < 1:
            raise ValueError("ae.grid.features and ae.grid.round_entries must be >= 1")
        if self.retrieval not in RETRIEVALS:
            RETRIEVALS.get(self.retrieval)  # raises with the available names and the closest match


def level_resolutions(levels: int, r_min: float, r_max: float) -> list[float]:
    """r_l = r_min * b^l (Suppl. A.1), snapped to the nearest integer when within 1e-6 of it.

    The snap matters: in float64 16 * b^15 is 64.00000000000003, whose ceil would add a vertex row.
    """
    if levels == 1:
        return [float(r_max)]
    b = math.exp((math.log(r_max) - math.log(r_min)) / (levels - 1))
    out = []
    for level in range(levels):
        r = r_min * b**level
        out.append(float(round(r)) if abs(r - round(r)) < 1e-6 else r)
    return out


@dataclass(frozen=True)
class GridLayout:
    """Sizes of every level of one group's grid; shared by all groups."""

    dims: int  # d = C_key + 2
    resolutions: tuple[float, ...]  # r_l
    vertices: tuple[int, ...]  # R_l + 1 per dimension
    entries: tuple[int, ...]  # table rows of each level
    offsets: tuple[int, ...]  # first row of each level in the group's table
    table_size: int  # T
    position: str

    @property
    def total_entries(self) -> int:
        return self.offsets[-1] + self.entries[-1]

    @property
    def num_dense(self) -> int:
        """Levels whose every vertex has its own row; the rest are capped at T (and wrap or hash)."""
        return sum(v**self.dims <= self.table_size for v in self.vertices)

    @classmethod
    def build(cls, cfg: GridConfig, dims: int, r_max: float) -> "GridLayout":
        table_size = 2**cfg.log2_table_size
        resolutions = level_resolutions(cfg.levels, cfg.r_min, r_max)
        vertices = tuple(math.ceil(r) + 1 for r in resolutions)
        entries, offsets, start = [], [], 0
        for v in vertices:
            rounded = -(-(v**dims) // cfg.round_entries) * cfg.round_entries
            entries.append(min(table_size, rounded))
            offsets.append(start)
            start += entries[-1]
        return cls(dims, tuple(resolutions), vertices, tuple(entries), tuple(offsets), table_size, cfg.position)


def _strides(layout: GridLayout, device: torch.device) -> Tensor:
    """Row-major strides tau_k = (R_l + 1)^k per level and dimension: (L, d)."""
    v = torch.tensor(layout.vertices, dtype=torch.int64, device=device)
    return torch.stack([v**k for k in range(layout.dims)], dim=-1)


def _combine(terms0: Tensor, terms1: Tensor, op) -> Tensor:
    """Per-dimension terms (..., d) of the low/high corner -> (..., 2^d); dim 0 is the top bit."""
    out = torch.stack([terms0[..., 0], terms1[..., 0]], dim=-1)
    for k in range(1, terms0.shape[-1]):
        pair = torch.stack([terms0[..., k], terms1[..., k]], dim=-1)
        out = op(out.unsqueeze(-1), pair.unsqueeze(-2)).flatten(-2)
    return out


@RETRIEVALS.register("grid")
def grid_index(lo: Tensor, layout: GridLayout) -> Tensor:
    """Paper Eq. 6: index = (sum_k x_k tau_k) mod T for the 2^d corners above `lo` (..., L, d)."""
    strides = _strides(layout, lo.device)  # (L, d)
    t0 = lo * strides
    idx = _combine(t0, t0 + strides, torch.add)  # (..., L, 2^d)
    dense = layout.num_dense
    if dense < len(layout.entries):  # only capped levels can exceed T
        idx[..., dense:, :] %= layout.table_size
    return idx


@RETRIEVALS.register("hash")
def hash_index(lo: Tensor, layout: GridLayout) -> Tensor:
    """Suppl. K / Instant-NGP: index = (XOR_k x_k pi_k) mod T on capped levels, Eq. 6 on dense ones.

    Products wrap at 32 bits as in tiny-cuda-nn's uint32 arithmetic (masked in int64 here).
    """
    dense = layout.num_dense
    idx = grid_index(lo, layout)
    if dense < len(layout.entries):
        primes = torch.tensor(HASH_PRIMES[: layout.dims], dtype=torch.int64, device=lo.device)
        x = lo[..., dense:, :]
        h0 = (x * primes) & 0xFFFFFFFF
        h1 = ((x + 1) * primes) & 0xFFFFFFFF
        idx[..., dense:, :] = _combine(h0, h1, torch.bitwise_xor) % layout.table_size
    return idx


def corner_weights(frac: Tensor) -> Tensor:
    """d-linear weights (..., d) -> (..., 2^d) as an outer product of the (1 - f, f) pairs."""
    w = torch.stack([1 - frac[..., 0], frac[..., 0]], dim=-1)
    for k in range(1, frac.shape[-1]):
        pair = torch.stack([1 - frac[..., k], frac[..., k]], dim=-1)
        w = (w.unsqueeze(-1) * pair.unsqueeze(-2)).flatten(-2)
    return w


def weight_derivatives(frac: Tensor) -> list[Tensor]:
    """d w_c / d f_j for every corner c and dimension j: d tensors of shape (..., 2^d)."""
    ones = torch.ones_like(frac[..., 0])
    out = []
    for j in range(frac.shape[-1]):
        w = None
        for k in range(frac.shape[-1]):
            pair = torch.stack([-ones, ones] if k == j else [1 - frac[..., k], frac[..., k]], dim=-1)
            w = pair if w is None else (w.unsqueeze(-1) * pair.unsqueeze(-2)).flatten(-2)
        out.append(w)
    return out


@dataclass(frozen=True)
class Level:
    """What the interpolation needs of one level: its one-level layout, scale and first table row."""

    layout: GridLayout
    scale: float
    shift: float
    max_lo: int
    offset: int


def _levels(layout: GridLayout) -> tuple[Level, ...]:
    out = []
    for l, r in enumerate(layout.resolutions):
        one = GridLayout(
            layout.dims, (r,), layout.vertices[l : l + 1], layout.entries[l : l + 1], (0,), layout.table_size, layout.position
        )
        ngp = layout.position == "ngp"
        out.append(Level(one, r - 1 if ngp else r, 0.5 if ngp else 0.0, layout.vertices[l] - 2, layout.offsets[l]))
    return tuple(out)


def _level_corners(q: Tensor, level: Level, index_fn, group_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of the flat (G * E, C) table for the 2^d corners (G, N, K), and the cell fractions (G, N, d)."""
    pos = q * level.scale + level.shift  # (G, N, d)
    # q = 1 with an integer r_l sits on the last vertex. A non-finite key gets a valid row but keeps
    # its NaN fraction, so the features (and the loss) turn NaN instead of an index error.
    lo = torch.nan_to_num(torch.floor(pos), nan=0.0).clamp_(0, level.max_lo)
    idx = index_fn(lo.long().unsqueeze(-2), level.layout).squeeze(-2)  # (G, N, K)
    return idx + group_rows, pos - lo


class _Interpolate(torch.autograd.Function):
    """Gather the 2^d corners of every (group, query, level) and interpolate; analytic backward.

    Levels are processed one at a time: each level's rows form a compact block of the table, so the
    gathers and scatter-adds stay in cache, and nothing but q is kept for the backward pass (the
    corners are recomputed), which keeps training memory small (Suppl. C).
    """

    @staticmethod
    def forward(ctx, tables, q, levels, index_fn):
        G, E, C = tables.shape
        flat = tables.reshape(G * E, C)
        group_rows = (torch.arange(G, device=q.device) * E).view(G, 1, 1)
        outs = []
        for level in levels:
            idx, frac = _level_corners(q, level, index_fn, group_rows + level.offset)
            feats = flat.index_select(0, idx.reshape(-1)).view(*idx.shape, C)  # (G, N, K, C)
            # (1 x K) @ (K x C) per query: several times faster on CPU than broadcast-multiply + sum.
            outs.append(torch.matmul(corner_weights(frac).unsqueeze(-2), feats).squeeze(-2))  # (G, N, C)
        ctx.save_for_backward(tables, q)
        ctx.levels, ctx.index_fn = levels, index_fn
        return torch.cat(outs, dim=-1)  # (G, N, L * C)

    @staticmethod
    def backward(ctx, grad_out):
        tables, q = ctx.saved_tensors
        G, E, C = tables.shape
        flat = tables.reshape(G * E, C)
        group_rows = (torch.arange(G, device=q.device) * E).view(G, 1, 1)
        need_tables, need_q = ctx.needs_input_grad[:2]
        grad_tables = torch.zeros_like(flat) if need_tables else None
        grad_q = torch.zeros_like(q) if need_q else None
        for l, level in enumerate(ctx.levels):
            g = grad_out[..., l * C : (l + 1) * C].unsqueeze(-2)  # (G, N, 1, C)
            idx, frac = _level_corners(q, level, ctx.index_fn, group_rows + level.offset)
            if need_tables:
                contrib = torch.matmul(corner_weights(frac).unsqueeze(-1), g)  # (G, N, K, C)
                grad_tables.index_add_(0, idx.reshape(-1), contrib.reshape(-1, C))
            if need_q:
                feats = flat.index_select(0, idx.reshape(-1)).view(*idx.shape, C)  # (G, N, K, C)
                fg = torch.matmul(feats, g.transpose(-1, -2))  # (G, N, K, 1): <f_c, dL/d out_l>
                dw = torch.stack(weight_derivatives(frac), dim=-2)  # (G, N, d, K)
                grad_q += torch.matmul(dw, fg).squeeze(-1) * level.scale  # d pos / d q = scale
        if need_tables:
            grad_tables = grad_tables.view(G, E, C)
        return grad_tables, grad_q, None, None


class MultiResolutionGrids(nn.Module):
    """N_h independent multi-resolution grids: queries (N_h, N, d) -> features (N_h, N, N_r * C_v)."""

    def __init__(self, cfg: GridConfig, groups: int, dims: int, r_max: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = GridLayout.build(cfg, dims, r_max)
        self.index_fn = RETRIEVALS.get(cfg.retrieval)
        self.tables = nn.Parameter(
            torch.empty(groups, self.layout.total_entries, cfg.features).uniform_(-cfg.init_scale, cfg.init_scale)
        )
        self.levels = _levels(self.layout)

    @property
    def out_features(self) -> int:
        return self.cfg.levels * self.cfg.features

    def forward(self, q: Tensor) -> Tensor:
        # Grids stay fp32 under autocast: interpolation weights of nearby keys differ by ~1/r_max^2.
        with torch.autocast(device_type="cuda" if q.is_cuda else "cpu", enabled=False):
            q = q.to(self.tables.dtype)
            return _Interpolate.apply(self.tables, q, self.levels, self.index_fn)

    @torch.no_grad()
    def hit_counts(self, q: Tensor, level: int = -1, chunk: int = 1 << 16) -> Tensor:
        """(G, entries) int64: how many interpolations of queries q use each row of `level` with non-zero weight."""
        lv = self.levels[level]
        counts = torch.zeros(q.shape[0], lv.layout.entries[0], dtype=torch.long, device=q.device)
        for start in range(0, q.shape[1], chunk):
            idx, frac = _level_corners(q[:, start : start + chunk].to(self.tables.dtype), lv, self.index_fn, 0)
            w = corner_weights(frac)  # (G, n, K)
            for g in range(q.shape[0]):
                rows = idx[g][w[g] > 0]
                counts[g].index_add_(0, rows, torch.ones_like(rows))
        return counts

    def usage(self, q: Tensor, level: int = -1, chunk: int = 1 << 16) -> Tensor:
        """Fraction of table rows of `level` touched (with non-zero weight) by queries q, per group."""
        return (self.hit_counts(q, level, chunk) > 0).float().mean(1)
