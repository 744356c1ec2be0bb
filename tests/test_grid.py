"""Feature-grid retrieval against a naive per-query, per-corner reference (paper Eq. 4, 6; Suppl. K)."""

import itertools
import math

import pytest
import torch

from brics_cli.models.grid import (
    HASH_PRIMES,
    GridConfig,
    GridLayout,
    MultiResolutionGrids,
    _Interpolate,
    grid_index,
    hash_index,
    level_resolutions,
)
from brics_cli.models.keycode import pixel_centre_coords
from brics_cli.models.separable import PixelGridInterpolate


def naive_index(corner, layout, level, retrieval):
    """One corner (python ints) -> row in the level's table, straight from the formulas."""
    V, T = layout.vertices[level], layout.table_size
    dense = V**layout.dims <= T
    if retrieval == "hash" and not dense:
        h = 0
        for x, prime in zip(corner, HASH_PRIMES):
            h ^= (x * prime) & 0xFFFFFFFF  # uint32 wrap-around
        return h % T
    return sum(x * V**k for k, x in enumerate(corner)) % T  # Eq. 6, tau_k = V^k


def naive_retrieve(tables, q, layout, retrieval):
    """Loop over groups, queries, levels and corners; autograd flows through plain tensor ops."""
    G, N, d = q.shape
    rows = []
    for g in range(G):
        per_query = []
        for n in range(N):
            feats = []
            for level, r in enumerate(layout.resolutions):
                scale = r - 1 if layout.position == "ngp" else r
                shift = 0.5 if layout.position == "ngp" else 0.0
                pos = q[g, n] * scale + shift
                lo = [min(max(math.floor(p.item()), 0), layout.vertices[level] - 2) for p in pos]
                acc = 0
                for bits in itertools.product((0, 1), repeat=d):
                    corner = [x + b for x, b in zip(lo, bits)]
                    w = 1
                    for k, b in enumerate(bits):
                        f = pos[k] - lo[k]
                        w = w * (f if b else 1 - f)
                    row = layout.offsets[level] + naive_index(corner, layout, level, retrieval)
                    acc = acc + w * tables[g, row]
                feats.append(acc)
            per_query.append(torch.cat(feats))
        rows.append(torch.stack(per_query))
    return torch.stack(rows)


@pytest.mark.parametrize("retrieval", ["grid", "hash"])
@pytest.mark.parametrize("position", ["paper", "ngp"])
@pytest.mark.parametrize("key_channels", [1, 2])
def test_values_and_gradients_match_naive_reference(retrieval, position, key_channels):
    torch.manual_seed(0)
    # T = 2^7 caps the finer levels, so Eq. 6's modulo and the hash are both exercised.
    cfg = GridConfig(retrieval=retrieval, levels=3, r_min=2, r_max=9, log2_table_size=7, position=position, init_scale=1.0)
    dims = key_channels + 2
    grids = MultiResolutionGrids(cfg, groups=2, dims=dims, r_max=cfg.r_max).double()
    assert grids.layout.num_dense < cfg.levels  # the capped path is really tested
    q = torch.rand(2, 7, dims, dtype=torch.float64)
    q[0, 0] = 1.0  # the far corner of the unit cube sits on the last vertex
    q[1, 1] = 0.0
    q.requires_grad_(True)

    out = grids(q)
    ref = naive_retrieve(grids.tables, q, grids.layout, retrieval)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    g = torch.randn_like(out)
    d_tables, d_q = torch.autograd.grad((out * g).sum(), [grids.tables, q])
    r_tables, r_q = torch.autograd.grad((ref * g).sum(), [grids.tables, q])
    torch.testing.assert_close(d_tables, r_tables, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_q, r_q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("retrieval", ["grid", "hash"])
def test_gradcheck_float64(retrieval):
    torch.manual_seed(1)
    cfg = GridConfig(retrieval=retrieval, levels=2, r_min=2, r_max=5, log2_table_size=5, init_scale=1.0)
    grids = MultiResolutionGrids(cfg, groups=2, dims=3, r_max=5).double()
    # Keep queries off cell boundaries, where the d-linear map is only piecewise differentiable.
    q = (torch.rand(2, 4, 3, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    def retrieve(tables, q):
        return _Interpolate.apply(tables, q, grids.levels, grids.index_fn)

    tables = grids.tables.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(retrieve, (tables, q), eps=1e-6, atol=1e-6)


def test_grid_index_matches_eq6_test_vectors():
    cfg = GridConfig(levels=2, r_min=3, r_max=40, log2_table_size=10)
    layout = GridLayout.build(cfg, dims=3, r_max=40)
    assert layout.vertices == (4, 41)
    lo = torch.tensor([[[1, 2, 0], [39, 17, 5]]])  # (1, L=2, d=3)
    idx = grid_index(lo, layout)
    # Level 0 (4^3 = 64 <= T, dense): x0 + 4 x1 + 16 x2 for the 8 corners, dim 0 the top bit.
    expected0 = [1 + 4 * 2 + 0, 1 + 4 * 2 + 16, 1 + 4 * 3, 1 + 4 * 3 + 16, 2 + 8, 2 + 8 + 16, 2 + 12, 2 + 12 + 16]
    # Level 1 (41^3 > 1024): (x0 + 41 x1 + 1681 x2) mod 1024.
    expected1 = [(x0 + 41 * x1 + 1681 * x2) % 1024 for x0 in (39, 40) for x1 in (17, 18) for x2 in (5, 6)]
    assert idx[0, 0].tolist() == expected0
    assert idx[0, 1].tolist() == expected1


def test_hash_index_matches_xor_primes_with_uint32_wraparound():
    cfg = GridConfig(levels=2, r_min=3, r_max=90, log2_table_size=12, retrieval="hash")
    layout = GridLayout.build(cfg, dims=3, r_max=90)
    lo = torch.tensor([[[1, 2, 0], [88, 61, 77]]])
    idx = hash_index(lo, layout)
    # 88 * 2654435761 and 77 * 805459861 exceed 2^32: the wrap-around matters here.
    expected1 = []
    for x0 in (88, 89):
        for x1 in (61, 62):
            for x2 in (77, 78):
                h = (x0 * 1) ^ ((x1 * 2654435761) % 2**32) ^ ((x2 * 805459861) % 2**32)
                expected1.append(h % 4096)
    assert idx[0, 1].tolist() == expected1
    assert idx[0, 0].tolist() == grid_index(lo, layout)[0, 0].tolist()  # dense level: plain index


def test_church_layout_matches_table3_and_authors_code():
    cfg = GridConfig(levels=16, r_min=16, r_max=64, log2_table_size=18, features=4)
    layout = GridLayout.build(cfg, dims=3, r_max=64)
    assert [v - 1 for v in layout.vertices] == [16, 18, 20, 22, 24, 26, 28, 31, 34, 37, 41, 45, 49, 54, 59, 64]
    assert layout.total_entries == 1_164_392
    assert 4 * layout.total_entries * 4 == 18_630_272  # Table 3: 18.6M for 4 groups
    assert layout.num_dense == 15


def test_level_resolutions_geometric_and_snapped():
    r = level_resolutions(16, 4, 64)
    assert r[0] == 4 and r[-1] == 64.0
    ratios = [b / a for a, b in zip(r[:-1], r[1:])]
    assert max(ratios) - min(ratios) < 1e-9


# Eq. 6 wraps a capped level onto every row once 25^3 > T. A hash only covers every row when the
# vertices outnumber the rows many times over (here 41^3 = 16.8 T); at 25^3 = 1.9 T it reaches ~80%.
@pytest.mark.parametrize("retrieval, r_max", [("grid", 24), ("hash", 40)])
def test_uniform_queries_use_every_entry_of_finest_level(retrieval, r_max):
    torch.manual_seed(0)
    cfg = GridConfig(retrieval=retrieval, levels=4, r_min=4, r_max=r_max, log2_table_size=12)
    grids = MultiResolutionGrids(cfg, groups=2, dims=3, r_max=r_max)
    assert grids.layout.entries[-1] == 2**12  # the finest level is capped
    usage = grids.usage(torch.rand(2, 200_000, 3), level=-1)
    assert usage.tolist() == [1.0, 1.0]


def test_usage_detects_unused_entries():
    cfg = GridConfig(levels=2, r_min=4, r_max=8, log2_table_size=16)
    grids = MultiResolutionGrids(cfg, groups=1, dims=3, r_max=8)
    q = torch.rand(1, 50_000, 3) * 0.5  # only the lower half-cube
    assert grids.usage(q, level=-1).item() < 0.3


@pytest.mark.parametrize("retrieval, position, key_channels", [("grid", "paper", 1), ("hash", "ngp", 1), ("grid", "ngp", 2), ("hash", "paper", 2)])
def test_separable_pixel_grid_path_matches_naive_reference(retrieval, position, key_channels):
    """The separable path (models/separable.py) against the per-corner reference, values and gradients."""
    torch.manual_seed(2)
    cfg = GridConfig(retrieval=retrieval, levels=3, r_min=2, r_max=9, log2_table_size=7, position=position, init_scale=1.0)
    G, B, H, W = 2, 2, 3, 4
    grids = MultiResolutionGrids(cfg, groups=G, dims=key_channels + 2, r_max=9).double()
    keys = torch.rand(G, B, H * W, key_channels, dtype=torch.float64)
    keys[0, 0, 0] = 1.0
    keys.requires_grad_(True)
    out = PixelGridInterpolate.apply(grids.tables, keys, grids.levels, grids.index_fn, (H, W))  # (G, B, P, L C)

    coords = pixel_centre_coords(H, W, dtype=torch.float64).permute(1, 2, 0).reshape(1, 1, H * W, 2)
    q = torch.cat([keys, coords.expand(G, B, H * W, 2)], dim=-1).reshape(G, B * H * W, key_channels + 2)
    ref = naive_retrieve(grids.tables, q, grids.layout, retrieval).view_as(out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    g = torch.randn_like(out)
    d_tables, d_keys = torch.autograd.grad((out * g).sum(), [grids.tables, keys])
    r_tables, r_keys = torch.autograd.grad((ref * g).sum(), [grids.tables, keys])
    torch.testing.assert_close(d_tables, r_tables, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_keys, r_keys, rtol=1e-10, atol=1e-12)


def test_separable_gradcheck_float64():
    torch.manual_seed(3)
    cfg = GridConfig(retrieval="hash", levels=2, r_min=2, r_max=5, log2_table_size=5, init_scale=1.0)
    grids = MultiResolutionGrids(cfg, groups=2, dims=3, r_max=5).double()
    keys = (torch.rand(2, 2, 6, 1, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    tables = grids.tables.detach().clone().requires_grad_(True)

    def retrieve(tables, keys):
        return PixelGridInterpolate.apply(tables, keys, grids.levels, grids.index_fn, (2, 3))

    assert torch.autograd.gradcheck(retrieve, (tables, keys), eps=1e-6, atol=1e-6)


def test_auto_interpolation_choice():
    from brics_cli.models.retrieval import FeatureRetrieval, MLPConfig

    cfg = GridConfig(levels=16, r_min=16, r_max=64)
    retrieval = FeatureRetrieval(cfg, MLPConfig(), groups=4, key_channels=1, r_max=64, channels=512)
    with torch.no_grad():  # inference: the cost model
        assert not retrieval.use_separable(1, (64, 64))
        assert retrieval.use_separable(12, (64, 64))
    assert retrieval.use_separable(1, (64, 64))  # training: the separable backward is cheaper


@pytest.mark.parametrize("interpolation", ["gather", "separable"])
def test_grids_stay_fp32_under_cpu_autocast(interpolation):
    from brics_cli.models.retrieval import FeatureRetrieval, MLPConfig

    grid = GridConfig(levels=4, r_min=4, r_max=16, log2_table_size=10, interpolation=interpolation)
    retrieval = FeatureRetrieval(grid, MLPConfig(hidden=8), groups=2, key_channels=1, r_max=16, channels=16)
    z_hat = torch.rand(2, 2, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = retrieval.retrieve(z_hat.bfloat16())
    assert raw.dtype == torch.float32
    torch.testing.assert_close(raw, retrieval.retrieve(z_hat.bfloat16().float()))
