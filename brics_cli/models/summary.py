"""Parameter counts, multiply-accumulates and memory of the autoencoder's components (`brics info`).

MACs are counted with torch.utils.flop_counter (FLOPs / 2) for one image at the recipe's resolution,
with the per-image (gather) retrieval path; the diffusion UNet's for one denoising step on one key
code (H_z x W_z x C_z).
The model is built on the `meta` device for counting, so even the 256x256 configurations cost no
memory and no compute. The counter sees matrix products and convolutions; elementwise work (the
d-linear interpolation, activations, noise, the [1,3,3,1] FIR blurs) is not counted, which is also
how the paper's and the authors' numbers were obtained.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from brics_cli.models.autoencoder import AutoencoderConfig, BRICSAutoencoder
from brics_cli.models.discriminator import Discriminator
from brics_cli.models.unet import UNet, UNetConfig


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() // 2


def component_report(cfg: AutoencoderConfig, resolution: int, unet: UNetConfig | None = None) -> dict[str, Any]:
    """{"components": {name: {"params", "macs"}}, "decode": {"params", "macs"}} for one image; with
    `unet`, also the diffusion UNet ("unet") for one step on one key code."""
    with torch.device("meta"):
        ae = BRICSAutoencoder(cfg, resolution).eval()
        # Count the per-image algorithm (gather the 2^d corners of each query). The separable path
        # that training batches may take adds dense products whose cost the whole batch shares.
        ae.retrieval.interpolation = "gather"
        disc = Discriminator(cfg.discriminator, resolution)
        x = torch.zeros(1, 3, resolution, resolution)
        z = torch.zeros(1, cfg.code.channels, cfg.code.resolution, cfg.code.resolution)
        f = torch.zeros(1, cfg.features.channels, cfg.features.resolution, cfg.features.resolution)
    grid_params = ae.retrieval.grids.tables.numel()
    components = {
        "encoder": {"params": count_params(ae.encoder), "macs": count_macs(lambda: ae.encoder(x))},
        "grids": {"params": grid_params, "macs": 0},
        "retrieval": {
            "params": count_params(ae.retrieval) - grid_params,
            "macs": count_macs(lambda: ae.features(z)),
        },
        "decoder": {"params": count_params(ae.decoder), "macs": count_macs(lambda: ae.decoder(f))},
        "discriminator": {"params": count_params(disc), "macs": count_macs(lambda: disc(x))},
    }
    if unet is not None:
        components["unet"] = unet_report(unet, cfg.code.channels, cfg.code.resolution)
    decode = {
        key: sum(components[name][key] for name in ("grids", "retrieval", "decoder")) for key in ("params", "macs")
    }
    layout = ae.retrieval.grids.layout
    grid = {
        "groups": cfg.groups,
        "levels": len(layout.entries),
        "r_max": cfg.r_max,
        "vertices_per_dim": [v - 1 for v in layout.vertices],
        "entries_per_level": list(layout.entries),
        "entries_per_group": layout.total_entries,
        "table_size": layout.table_size,
        "dense_levels": layout.num_dense,
        "static_bytes_per_group": layout.total_entries * cfg.grid.features * 4,
    }
    return {"components": components, "decode": decode, "grid": grid}


def unet_report(cfg: UNetConfig, channels: int, resolution: int) -> dict[str, int]:
    """{"params", "macs"} of the diffusion UNet for one step on one (channels, resolution, resolution) code."""
    with torch.device("meta"):
        net = UNet(cfg, channels, resolution).eval()
        x = torch.zeros(1, channels, resolution, resolution)
        logsnr = torch.zeros(1)
    return {"params": count_params(net), "macs": count_macs(lambda: net(x, logsnr))}


class _LiveBytes(TorchDispatchMode):
    """Tracks bytes of live tensor storages created inside the mode and their peak (CPU or CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def release(key=key, nbytes=nbytes) -> None:
            self._seen.discard(key)
            self.live -= nbytes

        weakref.finalize(storage, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: not an allocation. Without this, a
        # reshape of a parameter created before the mode (e.g. the grid tables) counted as new bytes.
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in inputs:
                self._track(t)
        return out


def retrieval_training_memory(cfg: AutoencoderConfig, resolution: int, batch: int = 1, device: str = "cpu") -> dict[str, int]:
    """Peak bytes of one training step (forward, backward) of grids + F_mlp at `batch` (Suppl. C).

    `step_peak_bytes` is the peak of everything allocated during the step (activations, saved
    tensors, the table gradient), which is what the paper measured by wrapping the module in the
    profiler (91.2 MB at batch 1); `static_bytes` are the tables and F_mlp weights held before it.
    """
    ae = BRICSAutoencoder(cfg, resolution).to(device).train()
    retrieval = ae.retrieval
    static = sum(p.numel() * p.element_size() for p in retrieval.parameters())
    z = torch.rand(batch, cfg.code.channels, cfg.code.resolution, cfg.code.resolution, device=device, requires_grad=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ae.features(z).square().mean().backward()
        torch.cuda.synchronize()
        peak_step = torch.cuda.max_memory_allocated() - before
    else:
        tracker = _LiveBytes()
        with tracker:
            ae.features(z).square().mean().backward()
        peak_step = tracker.peak
    return {"batch": batch, "static_bytes": static, "step_peak_bytes": peak_step, "total_bytes": static + peak_step}
