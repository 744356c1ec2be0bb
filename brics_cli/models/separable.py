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
products cost the same whatever the batch size, so for inference `interpolation: auto` uses this
path when the batch is large enough to amortise them and the plain gather otherwise; for training
it always uses it (its backward is cheaper even at batch 1). `brics info` counts the gather path. Results equal the gather path up to float rounding (tests compare both
with a naive per-corner reference).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from brics_cli.models.grid import GridLayout, Level, grid_index


# Cost of gathering one corner row relative to one multiply-accumulate of a dense matrix product,
# both per channel. Calibrated for the forward pass on a 2-core x86 CPU with torch 2.14: the paper's
# configuration (16 levels, r_max 64, 64x64 queries) runs forward in 0.08 s (gather) vs 0.10 s
# (separable) at batch 1 and 0.46 s vs 0.17 s at batch 4.
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


@functools.lru_cache(maxsize=256)
def axis_weights(level: Level, n: int, device, dtype) -> Tensor:
    """(n, V) matrix: row j holds the two linear weights of pixel centre (j + 0.5) / n at this level."""
    V = level.layout.vertices[0]
    pos = (torch.arange(n, device=device, dtype=torch.float64) + 0.5) / n * level.scale + level.shift
    lo = torch.nan_to_num(torch.floor(pos), nan=0.0).clamp_(0, level.max_lo)  # NaN keys: NaN features, valid rows
    frac = pos - lo
    m = torch.zeros(n, V, device=device, dtype=torch.float64)
    rows = torch.arange(n, device=device)
    m[rows, lo.long()] = 1 - frac
    m[rows, lo.long() + 1] += frac
    return m.to(dtype)


@functools.lru_cache(maxsize=256)
def virtual_rows(level: Level, index_fn, device) -> Tensor | None:
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
    """keys (G, B, P, C_key) on an H x W pixel grid -> (G, B, P, L * C); gradients to tables and keys.

    Per-query work runs channel-major -- (C, M) tensors with M = G * B * P queries contiguous -- so
    every elementwise step is a long vectorised loop; the output is returned as a transposed view.
    """

    @staticmethod
    def forward(ctx, tables, keys, levels, index_fn, size):
        G, E, C = tables.shape
        _, B, P, C_key = keys.shape
        H, W = size
        M = G * B * P
        keys_t = keys.permute(3, 0, 1, 2).reshape(C_key, M)  # (C_key, M)
        # Row of each query's pixel block in the stacked per-pixel tables, before scaling by V_k.
        pixel = (torch.arange(G, device=keys.device).view(G, 1, 1) * P + torch.arange(P, device=keys.device)).expand(G, B, P)
        pixel = pixel.reshape(M)
        out = torch.empty(len(levels) * C, M, dtype=tables.dtype, device=tables.device)
        saved = []
        for l, level in enumerate(levels):
            V = level.layout.vertices[0]
            V_k = V**C_key
            Tv = _virtual_table(tables, level, index_fn, V, C_key)  # (G, V_y, V_x, V_k * C)
            M_y = axis_weights(level, H, keys.device, tables.dtype)
            M_x = axis_weights(level, W, keys.device, tables.dtype)
            U = torch.matmul(M_x, Tv)  # (G, V_y, W, V_k C): interpolate along x
            Txy = torch.matmul(M_y, U.reshape(G, V, -1))  # (G, H, W V_k C): then along y
            rows, frac = _key_corners(keys_t, level, V, pixel * V_k)  # (Kc/2, M) lower corners along k_0
            # Corners k_0 and k_0 + 1 are adjacent rows: one index fetches both from a view of
            # overlapping (2, C) windows, halving the number of indexed rows.
            flat = Txy.reshape(G * P * V_k, C)
            windows = flat.as_strided((flat.shape[0] - 1, 2, C), (C, C, 1))
            win = windows.index_select(0, rows.reshape(-1)).view(rows.shape[0], M, 2, C)
            feats = win.permute(2, 0, 3, 1).reshape(-1, C, M)  # (Kc, C, M), k_0 the top bit
            if C_key == 1:  # the paper's case: a lerp between the two key corners
                diff = feats[1] - feats[0]  # (C, M); also d out / d frac, all the backward needs
                torch.addcmul(feats[0], diff, frac, out=out[l * C : (l + 1) * C])
                feats = diff
            else:
                torch.sum(corner_weights_cm(frac).unsqueeze(1) * feats, dim=0, out=out[l * C : (l + 1) * C])
            saved.append((rows, frac, feats, M_x, M_y))
        ctx.saved = saved
        ctx.meta = (tables.shape, levels, index_fn, (G, B, P, C_key), (H, W))
        return out.view(-1, G, B, P).permute(1, 2, 3, 0)  # (G, B, P, L C), a transposed view

    @staticmethod
    def backward(ctx, grad_out):
        (G, E, C), levels, index_fn, (_, B, P, C_key), (H, W) = ctx.meta
        M = G * B * P
        need_tables, need_keys = ctx.needs_input_grad[:2]
        grad_t = grad_out.permute(3, 0, 1, 2).reshape(-1, M)  # (L C, M)
        # Every level block is assigned below (not accumulated), so no zero-fill of the whole table.
        grad_tables = torch.empty(G, E, C, dtype=grad_out.dtype, device=grad_out.device) if need_tables else None
        grad_keys = torch.zeros(C_key, M, dtype=grad_out.dtype, device=grad_out.device) if need_keys else None
        for l, (level, (rows, frac, feats, M_x, M_y)) in enumerate(zip(levels, ctx.saved)):
            g = grad_t[l * C : (l + 1) * C]  # (C, M)
            if need_keys and C_key == 1:
                grad_keys[0] += (feats * g).sum(0) * level.scale  # feats holds f_1 - f_0 here
            elif need_keys:
                fg = (feats * g).sum(1)  # (Kc, M): <f_c, dL/d out_l>
                for j, dw in enumerate(weight_derivatives_cm(frac)):
                    grad_keys[j] += (dw * fg).sum(0) * level.scale
            if need_tables:
                V = level.layout.vertices[0]
                V_k = V**C_key
                if C_key == 1:
                    upper = g * frac  # (C, M)
                    contrib = torch.stack([g - upper, upper]).permute(0, 2, 1)  # (2, M, C)
                else:
                    contrib = (corner_weights_cm(frac).unsqueeze(1) * g).permute(0, 2, 1)  # (Kc, M, C)
                all_rows = torch.cat([rows, rows + 1])  # (Kc, M): upper corners along k_0 are the next rows
                dTxy = torch.zeros(G * H * W * V_k, C, dtype=g.dtype, device=g.device)
                dTxy.index_add_(0, all_rows.reshape(-1), contrib.reshape(-1, C))
                dU = torch.matmul(M_y.t(), dTxy.view(G, H, -1)).view(G, V, W, -1)  # (G, V_y, W, V_k C)
                dTv = torch.matmul(M_x.t(), dU).reshape(G, -1, C)  # (G, V_y V_x V_k, C)
                block = grad_tables[:, level.offset : level.offset + level.layout.entries[0]]
                _scatter_virtual(block, dTv, level, index_fn)
        if need_keys:
            grad_keys = grad_keys.view(C_key, G, B, P).permute(1, 2, 3, 0)
        return grad_tables, grad_keys, None, None, None


def corner_weights_cm(frac: Tensor) -> Tensor:
    """Channel-major d-linear weights: frac (D, M) -> (2^D, M), dimension 0 the top bit."""
    w = torch.stack([1 - frac[0], frac[0]])
    for k in range(1, frac.shape[0]):
        w = (w.unsqueeze(1) * torch.stack([1 - frac[k], frac[k]]).unsqueeze(0)).reshape(-1, frac.shape[1])
    return w


def weight_derivatives_cm(frac: Tensor) -> list[Tensor]:
    """d w / d frac_j for each dimension j, channel-major: D tensors of shape (2^D, M)."""
    out = []
    for j in range(frac.shape[0]):
        w = None
        for k in range(frac.shape[0]):
            if k == j:
                pair = torch.tensor([-1.0, 1.0], dtype=frac.dtype, device=frac.device).view(2, 1).expand(2, frac.shape[1])
            else:
                pair = torch.stack([1 - frac[k], frac[k]])
            w = pair if w is None else (w.unsqueeze(1) * pair.unsqueeze(0)).reshape(-1, frac.shape[1])
        out.append(w)
    return out


def _virtual_table(tables: Tensor, level: Level, index_fn, V: int, C_key: int) -> Tensor:
    """The level's rows for every vertex of its (V_y, V_x, V_k) grid: (G, V_y, V_x, V_k C)."""
    G, _, C = tables.shape
    n, T = V ** (C_key + 2), level.layout.table_size
    block = tables[:, level.offset : level.offset + level.layout.entries[0]]
    if n <= T:
        dense = block[:, :n]  # dense level: vertex i is row i
    elif index_fn is grid_index:
        dense = torch.cat([block] * (n // T) + [block[:, : n % T]], dim=1)  # Eq. 6 wraps: vertex i is row i mod T
    else:
        dense = block.index_select(1, virtual_rows(level, index_fn, tables.device))
    return dense.reshape(G, V, V, V**C_key * C)


def _scatter_virtual(block: Tensor, dTv: Tensor, level: Level, index_fn) -> None:
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


def _key_corners(keys_t: Tensor, level: Level, V: int, pixel_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of the lower key corners along k_0 (Kc / 2, M) in the per-pixel tables, and fractions (C_key, M)."""
    C_key = keys_t.shape[0]
    pos = keys_t * level.scale + level.shift
    lo = torch.nan_to_num(torch.floor(pos), nan=0.0).clamp_(0, level.max_lo)  # NaN keys: NaN features, valid rows
    frac = pos - lo
    lo = lo.long()
    strides = [V**i for i in range(C_key)]
    base = pixel_rows + sum(lo[i] * strides[i] for i in range(C_key))  # (M,)
    # Lower corners along k_0 (the top bit of the corner order); k_0 + 1 is the next row.
    offsets = [sum(((c >> (C_key - 1 - k)) & 1) * strides[k] for k in range(1, C_key)) for c in range(2 ** (C_key - 1))]
    return torch.stack([base + o for o in offsets]), frac
