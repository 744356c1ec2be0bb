"""`brics sample --num-samples N --out DIR`: images from a trained diffusion run, reproducible per index."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from brics_cli.cli.output import emit_json, renamed, required


def sample(
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="Number of images to make (indices 0 .. N-1). Required."),
    out: Path = typer.Option(..., "--out", help="Output folder: 000000.png ..., manifest.json, grid.png."),
    source: Optional[Path] = typer.Option(None, "--from", help="The run to sample: its root (run.dir), its diffusion/ folder or a checkpoint (default: the newest under runs/)."),
    batch: int = typer.Option(16, "--batch", help="Codes sampled together (does not change any image); best a multiple of --chunk."),
    chunk: int = typer.Option(8, "--chunk", help="Rows per UNet call, fixed so images do not depend on --batch (part of the sampler settings)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="ddpm, ddim, dpm-solver++ or heun (default: the recipe's diffusion.sample.sampler)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (default: the recipe's); heun makes ~2 UNet calls per step."),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM eta (0 = deterministic)."),
    seed: int = typer.Option(0, "--seed", help="Image i depends only on (checkpoint, sampler, steps, eta, seed, i)."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Sample with the raw weights instead of the EMA."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    npz: Optional[Path] = typer.Option(None, "--npz", help="Also write the images as FILE.npz for the ADM / guided-diffusion evaluator (arr_0: uint8 N x H x W x 3)."),
    json_output: bool = typer.Option(False, "--json", help="Print the manifest as one JSON object on stdout."),
    old_n: Optional[int] = typer.Option(None, "--n", hidden=True),
    old_run: Optional[Path] = typer.Option(None, "--run", hidden=True),
) -> None:
    """Sample key codes with the diffusion model, decode them with the autoencoder, write PNGs.

    A rerun writes only the missing images; under torchrun the indices are split over ranks.
    """
    from brics_cli.infer.sample import sample_run

    n = required(renamed(num_samples, old_n, "--num-samples", "--n"), "--num-samples")
    manifest = sample_run(renamed(source, old_run, "--from", "--run"), n, out, batch=batch, chunk=chunk, sampler=sampler,
                          steps=steps, eta=eta, seed=seed, ema=not no_ema, device=device, npz=npz)
    if manifest is None:  # not rank 0
        return
    if "stopped_by" in manifest:
        print(f"{manifest['stopped_by']}: stopped after {manifest['written']} new images in {out}; "
              "rerun the same command to write the rest", file=sys.stderr)
        if json_output:
            emit_json(manifest)
        return
    if json_output:
        emit_json({k: v for k, v in manifest.items() if k != "files"} | {"out": str(out)})
    else:
        print(f"wrote {n} images to {out} ({manifest['sampler']}, {manifest['steps']} steps, seed {seed}); "
              f"grid.png shows the first {min(n, 64)}" + (f"; {npz}: arr_0 {tuple(manifest['npz']['shape'])} uint8" if npz else ""))
