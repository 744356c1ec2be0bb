"""`brics sample`: indices -> key codes (a SAMPLERS entry) -> the AE's decoder -> PNG files.

Image i depends only on (checkpoint, sampler settings, seed, i): every random number of sample i
comes from its own generator (`sample_generator(seed, i)`), the UNet has no batch statistics, it
always runs on blocks of exactly `chunk` rows (zero-padded; BLAS kernels picked by the row count
round differently, the row's position within a block does not matter -- measured), and each image
is decoded on its own. So the batch size, the number of ranks (torchrun splits the indices
i = rank mod world) and interruptions do not change any image (on one device type). Each PNG is
written atomically; a rerun writes only the missing indices -- and the damaged ones: an existing
file counts as done only if it decodes completely, ends with PNG's IEND chunk and has the
autoencoder's size, so a rerun repairs a truncated or foreign file.

With `npz`, the finished folder is also written as the batch the ADM / guided-diffusion evaluator
reads (`np.load(FILE)["arr_0"]`, uint8 (N, H, W, 3), images in index order), after every run that
completes -- a rerun that finds every image already there too -- and named in the manifest.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from brics_cli.core.files import atomic_open, atomic_write_bytes, atomic_write_json, remove_stale_temporaries, sha256_file
from brics_cli.core.images import ImageSkip, load_image, png_bytes, save_image_grid
from brics_cli.core.progress import Progress
from brics_cli.core.locks import folder_lock
from brics_cli.core.signals import StopRequest
from brics_cli.core.runtime import resolve_device, setup_runtime
from brics_cli.diffusion.config import NO_ETA_SAMPLERS
from brics_cli.diffusion.loss import x0_to_codes
from brics_cli.diffusion.model import DiffusionModel
from brics_cli.diffusion.samplers import sample_generators
from brics_cli.errors import BricsError, ConfigError
from brics_cli.models.autoencoder import BRICSAutoencoder
from brics_cli.registry import SAMPLERS
from brics_cli.runs import checkpoint_to_read, record_output, run_of_checkpoint


def file_name(index: int) -> str:
    return f"{index:06d}.png"


def fixed_blocks(model, chunk: int):
    """`model(x, logsnr)` evaluated on blocks of exactly `chunk` rows, so row i's arithmetic never depends on B."""

    def run(x: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        pad = (-B) % chunk
        if pad:  # padding rows share the batch's noise level: one distinct level, as in the real rows
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
            logsnr = torch.cat([logsnr, logsnr[:1].expand(pad)])
        return torch.cat([model(x[i:i + chunk], logsnr[i:i + chunk]) for i in range(0, B + pad, chunk)])[:B]

    return run


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last 12 bytes of every complete PNG: IEND, length 0, its CRC


def is_complete_sample(path: Path, resolution: int | None) -> bool:
    """A PNG that decodes completely, is not cut short after its pixels (PIL reads those without the
    IEND chunk) and is resolution x resolution when that is given."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(PNG_END), 2)
            if f.read() != PNG_END:
                return False
        image = load_image(path)  # (3, H, W); decodes every pixel
    except (OSError, ImageSkip):  # gone, shorter than 12 bytes, truncated, not an image
        return False
    return resolution is None or tuple(image.shape[-2:]) == (resolution, resolution)


def missing_indices(out: Path, n: int, rank: int = 0, world_size: int = 1, resolution: int | None = None) -> list[int]:
    """This rank's indices (i = rank mod world_size) that still need an image: no file, or one that is not a complete sample."""
    return [i for i in range(rank, n, world_size) if not is_complete_sample(out / file_name(i), resolution)]


@torch.no_grad()
def generate(
    unet,
    schedule,
    ae,
    code_shape: tuple[int, int, int],
    out: Path,
    indices: list[int],
    *,
    sampler: str,
    steps: int,
    eta: float,
    seed: int,
    batch: int,
    chunk: int = 8,
    clip_x0: bool = True,
    device: torch.device = torch.device("cpu"),
    progress: Callable[[int], None] | None = None,
    stop: StopRequest | None = None,
) -> int:
    """Write out/NNNNNN.png for every index; returns the number written. Ends early, after a whole
    batch, when `stop` is requested (SIGINT / SIGTERM / SIGUSR1)."""
    sample = SAMPLERS.get(sampler)
    model = fixed_blocks(unet, chunk)
    written = 0
    for start in range(0, len(indices), batch):
        chunk = indices[start:start + batch]
        x0 = sample(model, schedule, code_shape, steps=steps, generators=sample_generators(seed, chunk), eta=eta,
                    clip_x0=clip_x0, device=device)
        codes = x0_to_codes(x0)
        for k, i in enumerate(chunk):
            # One image per decode: the decoder's style matmuls are not bitwise batch-invariant on
            # every BLAS, and decoding is ~1/steps of the sampling cost anyway.
            image = ae.decode(codes[k:k + 1])[0].clamp(-1, 1)
            atomic_write_bytes(out / file_name(i), png_bytes(image))
        written += len(chunk)
        if progress is not None:
            progress(len(chunk))
        if stop is not None and stop.requested:
            break
    return written


def resolve_sample_settings(meta: dict[str, Any], sampler: str | None, steps: int | None, eta: float | None) -> dict[str, Any]:
    """The sampler, steps and eta to use: the flags, else the recipe's `diffusion.sample`."""
    s = meta["config"]["diffusion"]["sample"]
    sampler = sampler or s["sampler"]
    SAMPLERS.get(sampler)  # unknown name: one line with the choices
    if eta and sampler in NO_ETA_SAMPLERS:
        raise ConfigError(f"--eta applies to the ddim sampler only; {sampler} takes none (drop --eta or use --sampler ddim)")
    eta = s["eta"] if eta is None and sampler == "ddim" else (eta or 0.0)
    return {"sampler": sampler, "steps": steps or s["steps"], "eta": eta, "clip_x0": s["clip_x0"]}


def sample_run(run: Path | None, n: int, out: Path, *, batch: int, chunk: int, sampler: str | None, steps: int | None,
               eta: float | None, seed: int, ema: bool, device: str, npz: Path | None = None) -> dict[str, Any] | None:
    """Write images 0 .. n-1 of a diffusion run (the newest under runs/ by default) into `out`,
    then manifest.json and grid.png (and the `npz` batch); returns the manifest on rank 0 (None on the others)."""
    if n < 1 or batch < 1 or chunk < 1:
        raise ConfigError("--num-samples, --batch and --chunk must be >= 1")
    resolve_device(device)  # a usage error before anything is looked up
    path = checkpoint_to_read(run, "diffusion", "pass --from RUN_OR_CHECKPOINT")
    rt = setup_runtime(device)
    try:
        model = DiffusionModel.from_checkpoint(path, ema=ema, device=rt.device)
        settings = resolve_sample_settings(model.meta, sampler, steps, eta)
        ae_ckpt = Path(model.meta["ae_checkpoint"])
        if not ae_ckpt.is_file():
            raise BricsError(f"{path}: its autoencoder checkpoint {ae_ckpt} is gone; sampling needs it to decode")
        ae = BRICSAutoencoder.from_checkpoint(ae_ckpt, ema=True, device=rt.device)
        with folder_lock(out, rt):
            if rt.is_main:
                remove_stale_temporaries(out)  # .NNNNNN.png.tmpPID of a killed run
            rt.barrier()
            todo = missing_indices(out, n, rt.rank, rt.world_size, ae.resolution)
            existing = len(range(rt.rank, n, rt.world_size)) - len(todo)
            if existing and rt.is_main:
                print(f"{out}: {existing} images already there; writing the missing {len(todo)}", file=sys.stderr)
            with Progress(rt.is_main, transient=True) as progress, StopRequest() as stop:
                task = progress.task("sample", len(todo))
                written = generate(model.unet, model.schedule, ae, model.code_shape, out, todo, seed=seed, batch=batch,
                                   chunk=chunk, device=rt.device, progress=task.advance, stop=stop, **settings)
            rt.barrier()
            if not rt.is_main:
                return None
            if stop.requested:
                return {"stopped_by": stop.signal_name, "written": written, "out": str(out)}
            manifest = write_sample_manifest(out, n, path, model.meta, settings, seed, ema, npz)
            record_output(path, "samples", out)  # `brics eval` without --samples finds it, wherever --out is
            return manifest
    finally:
        rt.shutdown()


def write_sample_manifest(out: Path, n: int, checkpoint: Path, meta: dict[str, Any], settings: dict[str, Any], seed: int,
                          ema: bool, npz: Path | None = None) -> dict[str, Any]:
    """manifest.json (what made the images, for `brics eval`), grid.png (the first 64, 8 per row) and the `npz` batch."""
    files = [file_name(i) for i in range(n)]
    absent = [f for f in files if not (out / f).is_file()]
    if absent:
        raise BricsError(f"{out}: {len(absent)} images missing after sampling (e.g. {absent[0]}); rerun to complete")
    if npz is not None:
        shape = write_npz_batch(Path(npz), [out / f for f in files])
    data = meta["config"]["data"]["shards"]
    data_manifest = Path(data) / "manifest.json"
    manifest = {
        "run": str(run_of_checkpoint(checkpoint)),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "ema": ema,
        "sampler": settings["sampler"],
        "steps": settings["steps"],
        "eta": settings["eta"],
        "seed": seed,
        "count": n,
        "files": files,
        "ae_checkpoint": meta["ae_checkpoint"],
        "data": data,
        "data_manifest_sha256": sha256_file(data_manifest) if data_manifest.is_file() else None,
    }
    if npz is not None:
        manifest["npz"] = {"path": str(npz), "key": "arr_0", "dtype": "uint8", "shape": list(shape), "sha256": sha256_file(npz)}
    atomic_write_json(out / "manifest.json", manifest)
    first = torch.stack([load_image(out / f) for f in files[:64]])
    save_image_grid(first, out / "grid.png", per_row=8)
    return manifest


def write_npz_batch(path: Path, images: list[Path]) -> tuple[int, int, int, int]:
    """`images` as `np.savez(path, arr_0=uint8 (N, H, W, 3))` writes them -- an uncompressed zip64 holding
    arr_0.npy, what the ADM / guided-diffusion evaluator `np.load`s -- streamed one image at a time (50k
    images at 256 x 256 are 9.8 GB: never twice in memory), written atomically as `atomic_write_bytes`
    does (`core.files.atomic_open`). Returns the shape."""
    first = _rgb_array(images[0])
    shape = (len(images), *first.shape)
    with atomic_open(path) as raw:
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for k, image in enumerate(images):
                    array = first if k == 0 else _rgb_array(image)
                    if array.shape != first.shape:
                        raise BricsError(f"{image}: {array.shape[:2]} pixels, but {images[0]} has {first.shape[:2]}; "
                                         "an .npz batch needs one size")
                    member.write(np.ascontiguousarray(array).tobytes())
    return shape


def _rgb_array(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
