"""`brics reconstruct`: reconstructions, grid.png and metrics.json (PSNR / SSIM / LPIPS, Table 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from brics_cli.cli.output import emit_json, renamed
from brics_cli.errors import ConfigError


def reconstruct(
    input: Path = typer.Option(..., "--input", help="Shard folder (its val split by default) or a folder of images."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    source: Optional[Path] = typer.Option(None, "--from", help="The autoencoder: a run root (run.dir), its ae/ folder or a checkpoint (default: the newest under runs/)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many images (default: all)."),
    batch: int = typer.Option(16, "--batch", help="Images per forward pass."),
    split: Optional[str] = typer.Option(None, "--split", help="Shard split: val or train (default: val if present)."),
    usage: bool = typer.Option(False, "--usage", help="Per-group grid usage and its histogram usage.png (Fig. 4b)."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Use the raw weights instead of the EMA."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    json_output: bool = typer.Option(False, "--json", help="Print metrics.json as one JSON object on stdout."),
    old_run: Optional[Path] = typer.Option(None, "--run", hidden=True),
    old_ckpt: Optional[Path] = typer.Option(None, "--ckpt", hidden=True),
    old_n: Optional[int] = typer.Option(None, "--n", hidden=True),
) -> None:
    """Encode and decode images with a trained autoencoder; PSNR/SSIM/LPIPS as mean and std (Table 2).

    LPIPS uses AlexNet (as the paper) when its weights are present; otherwise it is reported as
    unavailable with the reason (`brics weights status`). Under torchrun the images are split over
    ranks (image i on rank i mod N); the metrics cover all of them and rank 0 prints them.
    """
    from brics_cli.infer.reconstruct import reconstruct_run

    if old_run is not None and old_ckpt is not None:
        raise ConfigError("give --run or --ckpt, not both (both are old names of --from)")
    source = renamed(source, old_run or old_ckpt, "--from", "--run" if old_run is not None else "--ckpt")
    done = reconstruct_run(input, out, source, n=renamed(limit, old_n, "--limit", "--n"), batch=batch, split=split,
                           usage=usage, ema=not no_ema, device=device)
    if done is None:  # not rank 0
        return
    result, meta = done
    if json_output:
        emit_json(result)
        return
    line = (f"{result['n']} images from {input} (step {meta['step']}{'' if no_ema else ', EMA'}): "
            f"PSNR {result['psnr']['mean']:.2f} +- {result['psnr']['std']:.2f} dB, "
            f"SSIM {result['ssim']['mean']:.4f} +- {result['ssim']['std']:.4f}")
    if result["lpips"] is not None:
        line += f", LPIPS {result['lpips']['mean']:.4f} +- {result['lpips']['std']:.4f}"
    else:
        line += " (LPIPS unavailable: see metrics.json)"
    print(line)
    if "usage" in result:
        print("grid usage per group: " + ", ".join(f"{100 * u:.1f}%" for u in result["usage"]))
    print(f"wrote {out}/grid.png, metrics.json" + (", usage.png" if usage else ""))
