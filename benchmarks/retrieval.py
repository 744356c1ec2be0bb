"""Speed of the retrieval module (grids + interpolation + F_mlp) against a straightforward implementation.

Paper configuration (Table 3, 64x64x4 codes): 4 groups, 16 levels (r_min 16, r_max 64), T = 2^18,
C_v = 4, F_mlp 64 -> 64 -> 64 -> 128, batch 4 of 64x64 queries (4 x 4096 queries per group).
Queries: uniform random key slices with the exact pixel-centre coordinates of a 64x64 feature block.

The baseline is what one writes first in PyTorch: one table per level, a Python loop over levels
and over the 2^d corners, the corner index and weight computed per corner, autograd for the rest.
All produce the same numbers (checked before timing). Times are medians over `--repeats` rounds in
which every implementation runs once, side by side in one process; compare the ratios, not the
absolute times. Implementations: `brics-gather`, `brics-separable` (ae.grid.interpolation), `brics`
(= auto, what training uses) and the straightforward baseline.

    python benchmarks/retrieval.py --out benchmarks/out/retrieval.json [--device cuda]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from brics_cli.models.grid import GridConfig
from brics_cli.models.keycode import key_queries, pixel_centre_coords
from brics_cli.models.retrieval import FeatureRetrieval, MLPConfig

from common import emit  # benchmarks/common.py (scripts run as `python benchmarks/NAME.py`)


class StraightforwardRetrieval(nn.Module):
    """Per-level tables, a loop over levels and corners, autograd everywhere; same F_mlp."""

    def __init__(self, fast: FeatureRetrieval) -> None:
        super().__init__()
        grids = fast.grids
        self.layout = grids.layout
        self.scales = [level.scale for level in grids.levels]
        self.tables = nn.ParameterList(
            nn.Parameter(grids.tables.detach()[:, off : off + n].clone())
            for off, n in zip(self.layout.offsets, self.layout.entries)
        )
        self.mlp = fast.mlp
        self.groups = fast.groups

    def forward(self, q: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        G, N, d = q.shape
        feats = []
        for level, table in enumerate(self.tables):
            V, E = self.layout.vertices[level], self.layout.entries[level]
            pos = q * self.scales[level]
            lo = torch.floor(pos).clamp(0, V - 2)
            frac = pos - lo
            lo = lo.long()
            flat = table.reshape(G * E, -1)
            group_offset = (torch.arange(G, device=q.device) * E)[:, None]
            acc = 0
            for bits in itertools.product((0, 1), repeat=d):
                corner = lo + torch.tensor(bits, device=q.device)
                idx = (corner * torch.tensor([V**k for k in range(d)], device=q.device)).sum(-1) % self.layout.table_size
                w = torch.ones_like(frac[..., 0])
                for k, b in enumerate(bits):
                    w = w * (frac[..., k] if b else 1 - frac[..., k])
                acc = acc + w.unsqueeze(-1) * flat.index_select(0, (idx + group_offset).reshape(-1)).view(G, N, -1)
            feats.append(acc)
        raw = torch.cat(feats, dim=-1)
        H, W = size
        B = N // (H * W)
        f = self.mlp(raw, B)
        return f.view(self.groups, B, H, W, -1).permute(1, 0, 4, 2, 3).reshape(B, -1, H, W)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    device, B, H = args.device, args.batch, 64

    grid = GridConfig(levels=16, r_min=16, r_max=64, log2_table_size=18, features=4)
    fast = FeatureRetrieval(grid, MLPConfig(hidden=64, layers=3), groups=4, key_channels=1, r_max=64, channels=512).to(device)
    naive = StraightforwardRetrieval(fast).to(device)
    z_hat = torch.rand(B, 4, H, H, device=device)  # tiled key codes, one channel per group
    q = key_queries(z_hat, 1).contiguous()
    assert torch.equal(q[0, : H * H, 1:], pixel_centre_coords(H, H, device).permute(1, 2, 0).reshape(-1, 2))

    def run(name, x):
        if name == "straightforward":
            return naive(x, (H, H))
        fast.interpolation = name.split("-")[-1]  # brics-auto | brics-gather | brics-separable
        return fast(x)

    inputs = {"straightforward": q}
    names = ["brics-auto", "brics-gather", "brics-separable", "straightforward"]
    with torch.no_grad():
        reference = run("straightforward", q)
        max_diff = max((run(n, z_hat) - reference).abs().max().item() for n in names[:3])
    assert max_diff < 1e-4, max_diff

    def fwd(name):
        with torch.no_grad():
            run(name, inputs.get(name, z_hat))

    def fwd_bwd(name):
        x = inputs.get(name, z_hat).clone().requires_grad_(True)  # key codes get gradients: that trains the encoder
        fast.zero_grad(set_to_none=True)
        naive.zero_grad(set_to_none=True)
        run(name, x).square().mean().backward()

    # Round-robin: every repeat runs each implementation once, so drifts of this shared machine hit
    # them alike; medians per implementation.
    times = {(name, kind): [] for name in names for kind in ("forward_s", "forward_backward_s")}
    for name in names:  # warm-up
        fwd(name)
        fwd_bwd(name)
    for _ in range(args.repeats):
        for name in names:
            times[(name, "forward_s")].append(time_once(lambda: fwd(name), device))
            times[(name, "forward_backward_s")].append(time_once(lambda: fwd_bwd(name), device))
    results = {
        name: {kind: statistics.median(times[(name, kind)]) for kind in ("forward_s", "forward_backward_s")}
        for name in names
    }
    results["brics"] = results.pop("brics-auto")
    report = {
        "benchmark": "retrieval",
        "config": {"batch": B, "queries_per_group": B * H * H, "groups": 4, "levels": 16, "T": 2**18, "C_v": 4},
        "results": results,
        "speedup": {
            "forward": results["straightforward"]["forward_s"] / results["brics"]["forward_s"],
            "forward_backward": results["straightforward"]["forward_backward_s"] / results["brics"]["forward_backward_s"],
        },
        "max_abs_diff": max_diff,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        },
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
