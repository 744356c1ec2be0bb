"""Sampling many images: indices -> key codes (a SAMPLERS entry) -> the AE's decoder -> PNG files.

Image i depends only on (checkpoint, sampler settings, seed, i): every random number of sample i
comes from its own generator (`sample_generator(seed, i)`), the UNet has no batch statistics, it
always runs on blocks of exactly `chunk` rows (zero-padded; BLAS kernels picked by the row count
round differently, the row's position within a block does not matter -- measured), and each image
is decoded on its own. So the batch size, the number of ranks (torchrun splits the indices
i = rank mod world) and interruptions do not change any image (on one device type). Each PNG is
written atomically; a rerun writes only the missing indices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from brics_cli.diffusion.loss import x0_to_codes
from brics_cli.diffusion.samplers import sample_generators
from brics_cli.registry import SAMPLERS
from brics_cli.train.checkpoint import atomic_write_bytes
from brics_cli.train.loop import png_bytes


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


def missing_indices(out: Path, n: int, rank: int = 0, world_size: int = 1) -> list[int]:
    return [i for i in range(rank, n, world_size) if not (out / file_name(i)).is_file()]


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
) -> int:
    """Write out/NNNNNN.png for every index; returns the number written."""
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
    return written
