"""`brics sample --n N --out DIR`: images from a trained diffusion run, reproducible per index."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from brics_cli.cli.output import emit_json


def newest_diffusion_run(root: Path = Path("runs")) -> Path | None:
    found = [p for p in root.glob("**/diffusion/checkpoints/step-*.safetensors")]
    return max(found, key=lambda p: p.stat().st_mtime).parent.parent if found else None


def sample(
    n: int = typer.Option(..., "--n", help="Number of images (indices 0 .. n-1)."),
    out: Path = typer.Option(..., "--out", help="Output folder: 000000.png ..., manifest.json, grid.png."),
    run: Optional[Path] = typer.Option(None, "--run", help="A diffusion run folder or checkpoint (default: the newest under runs/)."),
    batch: int = typer.Option(16, "--batch", help="Codes sampled together (does not change any image); best a multiple of --chunk."),
    chunk: int = typer.Option(8, "--chunk", help="Rows per UNet call, fixed so images do not depend on --batch (part of the sampler settings)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="ddpm or ddim (default: the recipe's diffusion.sample.sampler)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (default: the recipe's)."),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM eta (0 = deterministic)."),
    seed: int = typer.Option(0, "--seed", help="Image i depends only on (checkpoint, sampler, steps, eta, seed, i)."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Sample with the raw weights instead of the EMA."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    json_output: bool = typer.Option(False, "--json", help="Print the manifest as one JSON object on stdout."),
) -> None:
    """Sample key codes with the diffusion model, decode them with the autoencoder, write PNGs.

    A rerun writes only the missing images; under torchrun the indices are split over ranks.
    """
    import torch

    from brics_cli.diffusion.generate import file_name, generate, missing_indices
    from brics_cli.errors import BricsError, ConfigError
    from brics_cli.data.shards import sha256_file
    from brics_cli.registry import SAMPLERS
    from brics_cli.train import checkpoint as ckpt
    from brics_cli.train.ae import load_autoencoder
    from brics_cli.train.diffusion import load_diffusion
    from brics_cli.train.loop import save_image_grid
    from brics_cli.train.runtime import setup_runtime

    if n < 1 or batch < 1 or chunk < 1:
        raise ConfigError("--n, --batch and --chunk must be >= 1")
    if run is None:
        run = newest_diffusion_run()
        if run is None:
            raise BricsError("no diffusion run found under runs/; pass --run DIR (train one with `brics diffusion-train`)")
        print(f"using the newest diffusion run: {run}", file=sys.stderr)
    path = run if run.is_file() else ckpt.CheckpointDir(run / "checkpoints").latest()
    if path is None:
        raise BricsError(f"{run}: no checkpoint (expected {run}/checkpoints/step-NNNNNN.safetensors)")
    rt = setup_runtime(device)
    try:
        unet, schedule, meta = load_diffusion(path, ema=not no_ema, device=rt.device)
        s = meta["config"]["diffusion"]["sample"]
        sampler = sampler or s["sampler"]
        SAMPLERS.get(sampler)  # unknown name: one line with the choices
        steps = steps or s["steps"]
        eta = s["eta"] if eta is None and sampler == "ddim" else (eta or 0.0)
        ae_ckpt = Path(meta["ae_checkpoint"])
        if not ae_ckpt.is_file():
            raise BricsError(f"{path}: its autoencoder checkpoint {ae_ckpt} is gone; sampling needs it to decode")
        ae, _ = load_autoencoder(ae_ckpt, ema=True, device=rt.device)
        out.mkdir(parents=True, exist_ok=True)
        todo = missing_indices(out, n, rt.rank, rt.world_size)
        existing = len(range(rt.rank, n, rt.world_size)) - len(todo)
        if existing:
            print(f"{out}: {existing} images already there; writing the missing {len(todo)}", file=sys.stderr)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]sample[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                      TimeRemainingColumn(), console=Console(file=sys.stderr), transient=True, disable=not rt.is_main) as bar:
            task = bar.add_task("sample", total=len(todo), rate="")
            import time

            t0 = time.perf_counter()

            def advance(k: int) -> None:
                bar.advance(task, k)
                done = bar.tasks[0].completed
                bar.update(task, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.2f} img/s")

            generate(unet, schedule, ae, tuple(meta["code_shape"]), out, todo, sampler=sampler, steps=steps, eta=eta,
                     seed=seed, batch=batch, chunk=chunk, clip_x0=s["clip_x0"], device=rt.device, progress=advance)
        rt.barrier()
        if not rt.is_main:
            return
        files = [file_name(i) for i in range(n)]
        absent = [f for f in files if not (out / f).is_file()]
        if absent:
            raise BricsError(f"{out}: {len(absent)} images missing after sampling (e.g. {absent[0]}); rerun to complete")
        data = meta["config"]["data"]["shards"]
        manifest = {
            "run": str(run if run.is_dir() else path.parent.parent),
            "checkpoint": str(path),
            "checkpoint_sha256": sha256_file(path),
            "ema": not no_ema,
            "sampler": sampler,
            "steps": steps,
            "eta": eta,
            "seed": seed,
            "count": n,
            "files": files,
            "ae_checkpoint": str(ae_ckpt),
            "data": data,
            "data_manifest_sha256": sha256_file(Path(data) / "manifest.json") if (Path(data) / "manifest.json").is_file() else None,
        }
        ckpt.atomic_write_json(out / "manifest.json", manifest)
        from PIL import Image
        import numpy as np

        first = [torch.from_numpy(np.array(Image.open(out / f).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
                 for f in files[:64]]
        cols = 8 if len(first) >= 8 else len(first)
        rows = [torch.stack(first[r:r + cols]) for r in range(0, len(first) - cols + 1, cols)]
        save_image_grid(rows, out / "grid.png")
        if json_output:
            emit_json({k: v for k, v in manifest.items() if k != "files"} | {"out": str(out)})
        else:
            print(f"wrote {n} images to {out} ({sampler}, {steps} steps, seed {seed}); grid.png shows the first {len(first)}")
    finally:
        rt.shutdown()
