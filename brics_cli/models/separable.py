"""Separable grid interpolation for queries on the pixel grid (an exact fast path of Eq. 4 / Fig. 9).

In BRICS every query is q = [key; x; y] where (x, y) are the pixel centres of the H_d x W_d feature
block: identical for every image and every group. The d-linear interpolation factorises into
interpolation over (x, y) -- a fixed linear map, the same for all queries -- followed by
interpolation over the key dimensions. For each level we therefore

1. view the level's table as a dense "virtual" grid (V_y, V_x, V_k, C) (dense levels: a view; capped
   or hashed levels: one gather of every vertex's row, so wrap-around and hashing stay exact),
2. interpolate it at the pixel centres with two small dense matrix products,
   M_y (H, V_y) and M_x (W, V_x), each row holding the two linear weights of a pixel -> a per-pixel
   table over key vertices (H W, V_k, C),
3. gather the 2^{C_key} key corners of each query from its pixel's table and interpolate.

Step 3 gathers 2^{C_key} rows per query instead of 2^{C_key + 2}, and the backward pass scatters
into the small per-pixel tables and maps them back with the transposed matrices. The matrix
products cost the same whatever the batch size, so `interpolation: auto` uses this path when the
batch is large enough to amortise them and the plain gather otherwise (always at batch 1, which is
what `brics info` counts). Results equal the gather path up to float rounding (tests compare both
with a naive per-corner reference).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from brics_cli.models.grid import GridLayout, _Level, corner_weights, grid_index, weight_derivatives


# Cost of gathering (and later scatter-adding) one corner row relative to one multiply-accumulate
# of a dense matrix product, both per channel. Calibrated on a 2-core x86 CPU with torch 2.14: the
# paper's configuration (16 levels, r_max 64, 64x64 queries) runs forward + backward in 0.52 s
# (gather) vs 0.73 s (separable) at batch 1 and 2.0 s vs 0.77 s at batch 4.
GATHER_COST = 300.0


def prefer_separable(layout: GridLayout, batch: int, size: tuple[int, int], key_channels: int) -> bool:
    """True when the separable path should be cheaper than gathering every query's 2^d corners."""
    H, W = size
    queries = batch * H * W
    gather = separable = 0.0
    for V in layout.vertices:
        V_k = V**key_channels
        gather += queries * 2**layout.dims * GATHER_COST
        matmuls = V * V * W * V_k + H * V * W * V_k  # interpolate along x, then along y
        separable += matmuls + H * W * V_k + queries * 2**key_channels * GATHER_COST
    return separable < gather


def axis_weights(level: _Level, n: int, device, dtype) -> Tensor:
    """(n, V) matrix: row j holds the two linear weights of pixel centre (j + 0.5) / n at this level."""
    V = level.layout.vertices[0]
    pos = (torch.arange(n, device=device, dtype=torch.float64) + 0.5) / n * level.scale + level.shift
    lo = torch.floor(pos).clamp_(0, level.max_lo)
    frac = pos - lo
    m = torch.zeros(n, V, device=device, dtype=torch.float64)
    rows = torch.arange(n, device=device)
    m[rows, lo.long()] = 1 - frac
    m[rows, lo.long() + 1] += frac
    return m.to(dtype)


@functools.lru_cache(maxsize=256)
def virtual_rows(level: _Level, index_fn, device) -> Tensor | None:
    """Table row of every vertex of a capped level, in (y, x, key...) row-major order; None if dense."""
    layout: GridLayout = level.layout
    V, d = layout.vertices[0], layout.dims
    if V**d <= layout.table_size:
        return None
    axes = [torch.arange(V, device=device)] * d
    # Row-major over (y, x, k_{C_key-1}, ..., k_0) == ascending Eq. 6 index with key dim 0 fastest.
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1).reshape(-1, 1, d)
    return index_fn(grid, layout)[:, 0, 0]  # corner 0 of each vertex is the vertex itself


class PixelGridInterpolate(torch.autograd.Function):
    """keys (G, B, P, C_key) on an H x W pixel grid -> (G, B, P, L * C); gradients to tables and keys."""

    @staticmethod
    def forward(ctx, tables, keys, levels, index_fn, size):
        G, E, C = tables.shape
        _, B, P, C_key = keys.shape
        H, W = size
        saved = []
        outs = []
        for level in levels:
            V = level.layout.vertices[0]
            V_k = V**C_key
            Tv = _virtual_table(tables, level, index_fn, V, C_key)  # (G, V_y, V_x, V_k * C)
            M_y = axis_weights(level, H, keys.device, tables.dtype)
            M_x = axis_weights(level, W, keys.device, tables.dtype)
            U = torch.matmul(M_x, Tv)  # (G, V_y, W, V_k C): interpolate along x
            Txy = torch.matmul(M_y, U.reshape(G, V, -1))  # (G, H, W V_k C): then along y
            rows, w, frac = _key_corners(keys, level, V, V_k)  # (G, B, P, Kc / 2): lower corners along k_0
            rows = rows + (torch.arange(G, device=keys.device) * P * V_k).view(G, 1, 1, 1)
            # Corners k_0 and k_0 + 1 are adjacent rows: gather both with one index from a view of
            # overlapping (2, C) windows, halving the number of indexed rows.
            flat = Txy.reshape(G * P * V_k, C)
            windows = flat.as_strided((flat.shape[0] - 1, 2, C), (C, C, 1))
            feats = windows.index_select(0, rows.reshape(-1)).view(*rows.shape, 2, C)
            feats = feats.transpose(-3, -2).reshape(*rows.shape[:-1], -1, C)  # (G, B, P, Kc, C), k_0 top bit
            # Batched (1 x Kc) @ (Kc x C) products: faster on CPU than broadcasting over tiny dims.
            outs.append(torch.matmul(w.unsqueeze(-2), feats).squeeze(-2))  # (G, B, P, C)
            saved.append((rows, frac, feats, M_x, M_y))
        ctx.saved = saved
        ctx.meta = (tables.shape, levels, index_fn, C_key, (H, W))
        return torch.cat(outs, dim=-1)

    @staticmethod
    def backward(ctx, grad_out):
        (G, E, C), levels, index_fn, C_key, (H, W) = ctx.meta
        need_tables, need_keys = ctx.needs_input_grad[:2]
        # Every level block is assigned below (not accumulated), so no zero-fill of the whole table.
        grad_tables = torch.empty(G, E, C, dtype=grad_out.dtype, device=grad_out.device) if need_tables else None
        grad_keys = None
        for l, (level, (rows, frac, feats, M_x, M_y)) in enumerate(zip(levels, ctx.saved)):
            g = grad_out[..., l * C : (l + 1) * C].unsqueeze(-2)  # (G, B, P, 1, C)
            if need_keys:
                fg = torch.matmul(feats, g.transpose(-1, -2))  # (G, B, P, Kc, 1): <f_c, dL/d out_l>
                dw = torch.stack(weight_derivatives(frac), dim=-2)  # (G, B, P, C_key, Kc)
                dk = torch.matmul(dw, fg).squeeze(-1) * level.scale  # (G, B, P, C_key)
                grad_keys = dk if grad_keys is None else grad_keys + dk
            if need_tables:
                V = level.layout.vertices[0]
                V_k = V**C_key
                contrib = torch.matmul(corner_weights(frac).unsqueeze(-1), g)  # (G, B, P, Kc, C)
                half = contrib.shape[-2] // 2
                pairs = contrib.unflatten(-2, (2, half)).transpose(-3, -2)  # (G, B, P, Kc/2, 2, C)
                acc = torch.zeros(G * H * W * V_k, 2, C, dtype=g.dtype, device=g.device)
                acc.index_add_(0, rows.reshape(-1), pairs.reshape(-1, 2, C))
                dTxy = acc[:, 0].clone()
                dTxy[1:] += acc[:-1, 1]  # the upper corner of row r lands on row r + 1
                dU = torch.matmul(M_y.t(), dTxy.view(G, H, -1)).view(G, V, W, -1)  # (G, V_y, W, V_k C)
                dTv = torch.matmul(M_x.t(), dU).reshape(G, -1, C)  # (G, V_y V_x V_k, C)
                block = grad_tables[:, level.offset : level.offset + level.layout.entries[0]]
                _scatter_virtual(block, dTv, level, index_fn)
        return grad_tables, grad_keys, None, None, None


def _virtual_table(tables: Tensor, level: _Level, index_fn, V: int, C_key: int) -> Tensor:
    """The level's rows for every vertex of its (V_y, V_x, V_k) grid: (G, V_y, V_x, V_k C)."""
    G, _, C = tables.shape
    n, T = V ** (C_key + 2), level.layout.table_size
    block = tables[:, level.offset : level.offset + level.layout.entries[0]]
    if n <= T:
        dense = block[:, :n]  # dense level: vertex i is row i
    elif index_fn is grid_index:
        dense = block.repeat(1, -(-n // T), 1)[:, :n]  # Eq. 6 wraps: vertex i is row i mod T
    else:
        dense = block.index_select(1, virtual_rows(level, index_fn, tables.device))
    return dense.reshape(G, V, V, V**C_key * C)


def _scatter_virtual(block: Tensor, dTv: Tensor, level: _Level, index_fn) -> None:
    """Write the gradient of every vertex (G, n, C) into the level's rows (the transpose of the above)."""
    n, T = dTv.shape[1], level.layout.table_size
    if n <= T:
        block[:, :n] = dTv
        block[:, n:] = 0  # rows added by rounding the level up to a multiple of 8
    elif index_fn is grid_index:
        block.copy_(dTv[:, :T])
        for start in range(T, n, T):  # fold the wrapped vertices back
            seg = dTv[:, start : start + T]
            block[:, : seg.shape[1]] += seg
    else:
        block.zero_()
        block.index_add_(1, virtual_rows(level, index_fn, dTv.device), dTv)


def _key_corners(keys: Tensor, level: _Level, V: int, V_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of the per-pixel key tables for the 2^C_key key corners, their weights and fractions."""
    G, B, P, C_key = keys.shape
    pos = keys * level.scale + level.shift
    lo = torch.floor(pos).clamp_(0, level.max_lo)
    frac = pos - lo
    lo = lo.long()
    strides = V ** torch.arange(C_key, device=keys.device)
    base = (lo * strides).sum(-1)  # (G, B, P)
    # Lower corners along k_0 (the top bit of corner_weights' order); k_0 + 1 is the next row.
    low = range(2 ** (C_key - 1))
    bits = torch.tensor([[0] + [(c >> (C_key - 1 - k)) & 1 for k in range(1, C_key)] for c in low], device=keys.device)
    offsets = (bits * strides).sum(-1)  # (Kc / 2,)
    pixel = torch.arange(P, device=keys.device).view(1, 1, P, 1) * V_k
    rows = pixel + base.unsqueeze(-1) + offsets  # (G, B, P, Kc / 2)
    return rows, corner_weights(frac), frac
