"""`brics reconstruct`: images -> key codes -> images with a trained autoencoder, measured as Table 2.

Deterministic: the model runs in eval mode, so no relaxed-precision noise and no KL sampling.
Output folder:

    inputs/000000.png ...   the images as the model saw them (cropped/resized to its resolution)
    recon/000000.png ...    their reconstructions (same names)
    grid.png                the first images (top) over their reconstructions (bottom)
    metrics.json            {"n", "psnr", "ssim", "lpips" | null, "lpips_unavailable"?, "usage"?}
    usage.png               (--usage) per group: how often each finest-level grid entry is hit (Fig. 4b)
    manifest.json           checkpoint, its sha256, input, keys of the images, images per rank, package version
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from brics_cli import __version__
from brics_cli.core.locks import folder_lock
from brics_cli.core.files import atomic_write_bytes, atomic_write_json, sha256_file
from brics_cli.core.images import ImageSkip, array_to_tensor, center_crop_box, crop_resize, decode_rgb, is_image_file, png_bytes, save_image_grid
from brics_cli.core.progress import Progress
from brics_cli.core.runtime import Runtime, resolve_device, setup_runtime
from brics_cli.data.config import DataConfig
from brics_cli.errors import BricsError
from brics_cli.eval.image_sets import LISTED_UNREADABLE
from brics_cli.eval.recon_metrics import ReconstructionMeter
from brics_cli.models.autoencoder import BRICSAutoencoder
from brics_cli.models.keycode import key_queries, tile_key_codes
from brics_cli.nets.perceptual import try_load_lpips
from brics_cli.runs import checkpoint_to_read, record_output


def folder_images(folder: Path, resolution: int, skipped: dict[str, int], unreadable: dict[str, str]) -> Iterator[tuple[torch.Tensor, str]]:
    """Images of a folder, centre-cropped and resized to the model's resolution; unreadable files are
    counted by category in `skipped` and named in `unreadable` (name -> "PATH: reason")."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p)):
        try:
            img, _ = decode_rgb(path.read_bytes())
            img = crop_resize(img, center_crop_box(*img.size), resolution, small="upscale")
        except (ImageSkip, OSError) as exc:
            category = getattr(exc, "category", "unreadable")
            skipped[category] = skipped.get(category, 0) + 1
            unreadable[path.relative_to(folder).as_posix()] = f"{path}: {exc}"
            continue
        yield array_to_tensor(np.asarray(img)), path.relative_to(folder).as_posix()


def shard_images(shards: Path, resolution: int, split: str | None) -> tuple[Iterator[tuple[torch.Tensor, str]], str, Any]:
    """Images of a shard folder's `split` (default: val when there is one, else train), in shard order."""
    from brics_cli.data.loader import ShardDataset

    manifest = json.loads((shards / "manifest.json").read_text())
    names = manifest.get("shards", {})
    if split is None:
        split = "val" if any(n.startswith("val-") for n in names) else "train"
    cfg = replace(DataConfig(), shards=str(shards), resolution=resolution, workers=0, shuffle=0, flip=False)
    dataset = ShardDataset(cfg, split)
    return iter(dataset), split, dataset


def usage_figure(counts: torch.Tensor, path: Path) -> None:
    """One panel per group: histogram of hits per finest-level entry, with the fraction hit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = counts.shape[0]
    cols = min(groups, 4)
    rows = -(-groups // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for g in range(groups):
        ax = axes[g // cols][g % cols]
        c = counts[g].cpu().numpy()
        ax.hist(c, bins=min(50, max(int(c.max()) + 1, 2)), color="#3b75af")
        ax.set_title(f"group {g}: {100 * (c > 0).mean():.1f}% hit", fontsize=9)
        ax.set_xlabel("hits per entry", fontsize=8)
        ax.set_ylabel("entries", fontsize=8)
        ax.tick_params(labelsize=7)
    for k in range(groups, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("finest-level grid entry hits (cf. paper Fig. 4b)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


BLOCK = 4  # rows per model call, whatever --batch is


def in_fixed_blocks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int = BLOCK) -> torch.Tensor:
    """fn over x in blocks of exactly `rows` (the last zero-padded): convolution kernels are chosen by
    the batch size and round differently, so this keeps every image independent of --batch."""
    pad = (-x.shape[0]) % rows
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    return torch.cat([fn(x[i:i + rows]) for i in range(0, x.shape[0], rows)])[: x.shape[0] - pad]


@torch.no_grad()
def reconstruct(
    model,
    checkpoint: Path,
    source: Path,
    out: Path,
    *,
    n: int | None = None,
    batch: int = 16,
    split: str | None = None,
    usage: bool = False,
    lpips_net: str = "alex",
    grid_images: int = 8,
    device: torch.device = torch.device("cpu"),
    progress: Callable[[int], None] | None = None,
    rt: Runtime | None = None,
) -> dict[str, Any]:
    """Reconstruct up to n images of `source` (shard folder or image folder) into `out`; returns metrics.

    Under torchrun (`rt` with several ranks) image i is reconstructed by rank i mod world_size; the
    per-image metrics, grid images and usage counts are gathered, so every rank returns the metrics
    of all images, and rank 0 alone writes metrics.json, manifest.json, grid.png and usage.png.
    """
    rank, world = (rt.rank, rt.world_size) if rt is not None else (0, 1)

    resolution = model.resolution
    skipped: dict[str, int] = {}
    unreadable: dict[str, str] = {}
    dataset = None
    if (source / "manifest.json").is_file():
        images, split, dataset = shard_images(source, resolution, split)
    elif source.is_dir():
        images = folder_images(source, resolution, skipped, unreadable)
    else:
        raise BricsError(f"--input {source}: neither a shard folder (with manifest.json) nor a folder of images")
    lpips_model, reason = try_load_lpips(lpips_net, device)
    meter = ReconstructionMeter(lpips_model, reason)
    counts = None
    keys: list[str] = []  # of every image, whichever rank reconstructs it
    mine: list[int] = []  # indices reconstructed here, in the order of the meter's values
    shown: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for folder in ("inputs", "recon"):
        (out / folder).mkdir(parents=True, exist_ok=True)

    def flush(xs: list[torch.Tensor], indices: list[int]) -> None:
        nonlocal counts
        x = torch.stack(xs).to(device)
        z = in_fixed_blocks(lambda block: model.encode(block)[0], x)
        recon = in_fixed_blocks(model.decode, z).float().clamp(-1, 1)
        meter.update(x, recon)
        if usage:
            cfg = model.cfg
            z_hat = tile_key_codes(z, (cfg.features.resolution,) * 2, cfg.code.tiling)
            c = model.retrieval.grids.hit_counts(key_queries(z_hat, cfg.code.key_channels))
            counts = c if counts is None else counts + c
        for i, index in enumerate(indices):
            atomic_write_bytes(out / "inputs" / f"{index:06d}.png", png_bytes(x[i]))
            atomic_write_bytes(out / "recon" / f"{index:06d}.png", png_bytes(recon[i]))
            if index < grid_images:
                shown.append((index, x[i].cpu(), recon[i].cpu()))
        mine.extend(indices)
        if progress is not None:
            progress(x.shape[0])

    pending: list[torch.Tensor] = []
    pending_indices: list[int] = []
    for image, key in images:
        if n is not None and len(keys) >= n:
            break
        keys.append(key)
        if (len(keys) - 1) % world != rank:
            continue
        pending.append(image)
        pending_indices.append(len(keys) - 1)
        if len(pending) == batch:
            flush(pending, pending_indices)
            pending, pending_indices = [], []
    if pending:
        flush(pending, pending_indices)
    if not keys:
        raise BricsError(f"--input {source}: no readable images" + (f" (skipped: {skipped})" if skipped else ""))
    per_rank = [len(mine)]  # images reconstructed by each rank
    if world > 1:
        counts, per_rank = _gather_over_ranks(meter, mine, shown, counts)
    result = meter.result()
    if usage and counts is not None:
        result["usage"] = (counts > 0).float().mean(1).tolist()
        if rank == 0:
            usage_figure(counts, out / "usage.png")
    if dataset is not None:
        skipped["corrupt"] = dataset.skipped.count
    result["skipped"] = {k: v for k, v in skipped.items() if v}
    if unreadable:  # reconstructions of the rest are still useful; `brics eval` is what refuses a metric
        result["unreadable"] = {"count": len(unreadable), "files": list(unreadable)[:LISTED_UNREADABLE]}
        if rank == 0:
            print(f"warning: {len(unreadable)} unreadable images in {source} left out (first: {next(iter(unreadable.values()))})",
                  file=sys.stderr)
    if rank != 0:
        return result
    shown.sort(key=lambda item: item[0])
    save_image_grid(torch.stack([a for _, a, _ in shown] + [b for _, _, b in shown]), out / "grid.png", per_row=len(shown))
    atomic_write_json(out / "metrics.json", result)
    atomic_write_json(out / "manifest.json", {
        "command": "reconstruct",
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "input": str(source),
        "split": split,
        "count": len(keys),
        "per_rank": per_rank,
        "keys": keys,
        "lpips_net": lpips_net if lpips_model is not None else None,
        "brics_version": __version__,
    })
    record_output(checkpoint, "reconstructions", out)  # `brics eval recon` without --samples finds it
    return result


def _gather_over_ranks(meter, mine: list[int], shown: list, counts: torch.Tensor | None) -> tuple[torch.Tensor | None, list[int]]:
    """Every rank's per-image metrics (into `meter`, in image order), grid images (into `shown`),
    grid hit counts (summed) and how many images each rank reconstructed."""
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (mine, meter.values, shown, None if counts is None else counts.cpu()))
    order = sorted((index, r, k) for r, (indices, _, _, _) in enumerate(parts) for k, index in enumerate(indices))
    for name in meter.values:
        meter.values[name] = [parts[r][1][name][k] for _, r, k in order if parts[r][1][name]]
    shown[:] = [item for part in parts for item in part[2]]
    summed = [part[3] for part in parts if part[3] is not None]
    return (torch.stack(summed).sum(0) if summed else None), [len(part[0]) for part in parts]


def reconstruct_run(input: Path, out: Path, source: Path | None, *, n: int | None, batch: int,
                    split: str | None, usage: bool, ema: bool, device: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """`brics reconstruct`: find the checkpoint in `source` (a run root, its ae/ folder or a checkpoint file;
    the newest ae run under runs/ by default), load it, reconstruct; returns (metrics, checkpoint metadata)
    on rank 0, None on the others."""
    resolve_device(device)  # a usage error before anything is looked up
    checkpoint = checkpoint_to_read(source, "ae", "pass --from RUN_OR_CHECKPOINT")
    rt = setup_runtime(device)
    try:
        model = BRICSAutoencoder.from_checkpoint(checkpoint, ema=ema, device=rt.device)
        with folder_lock(out, rt), Progress(rt.is_main, transient=True) as progress:
            task = progress.task("reconstruct", None if n is None else len(range(rt.rank, n, rt.world_size)))
            result = reconstruct(model, checkpoint, input, out, n=n, batch=batch, split=split, usage=usage,
                                 device=rt.device, progress=task.advance, rt=rt)
    finally:
        rt.shutdown()
    return (result, model.checkpoint_meta) if rt.is_main else None
