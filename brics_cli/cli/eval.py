"""`brics eval fid|clip-fid|is|kid|prc|all|recon`: the paper's metrics with their protocol (Tables 2, 4, 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from brics_cli.cli.output import emit_json

def eval_command(
    metric: str = typer.Argument(..., help="fid | clip-fid | is | kid | prc | all (every generative metric) | recon."),
    samples: Optional[Path] = typer.Option(
        None, "--samples", help="`brics sample` output (recon: `brics reconstruct` output). Default: the newest under --runs."
    ),
    ref: Optional[str] = typer.Option(
        None, "--ref", help="Reference shard folder or image folder. Default: the training data recorded for the samples."
    ),
    split: str = typer.Option("train", "--split", help="Split of the reference shards (the paper: train)."),
    n: Optional[int] = typer.Option(None, "--n", help="Use the first N generated images (default: all)."),
    n_ref: Optional[int] = typer.Option(None, "--n-ref", help="Use the first N reference images (default: all)."),
    batch: int = typer.Option(64, "--batch", help="Images per forward pass."),
    workers: int = typer.Option(0, "--workers", help="DataLoader workers decoding images."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where to look for the newest samples when --samples is not given."),
    lpips_net: str = typer.Option("alex", "--lpips-net", help="recon: LPIPS backbone alex (the paper's evaluation) | vgg | none."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Measure generated images like the paper's Tables 4/5 (FID, IS, KID and precision/recall through
    torch-fidelity; CLIP-FID through clean-fid), or reconstructions like Table 2 (PSNR, SSIM, LPIPS).
    The result, with its protocol, is also written to DIR/eval-METRIC.json. Under torchrun the ranks
    share the images and give the numbers of one process."""
    from brics_cli.eval.commands import run_eval

    written = run_eval(metric, samples, ref, split=split, n=n, n_ref=n_ref, batch=batch, workers=workers, device=device,
                       runs=runs, lpips_net=lpips_net)
    if written is None:  # under torchrun, not rank 0: rank 0 prints
        return
    result, out = written
    if json_output:
        emit_json(result)
    else:
        _print(metric, result, out)


def _print(metric: str, result: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    proto = result["protocol"]
    if metric == "recon":
        table = Table(title=f"reconstructions: {proto['n']} pairs in {proto['folder']}")
        table.add_column("metric")
        table.add_column("mean +- std", justify="right")
        for key, label in (("lpips", "LPIPS"), ("ssim", "SSIM"), ("psnr", "PSNR (dB)")):
            if result.get(key):
                table.add_row(label, f"{result[key]['mean']:.4f} +- {result[key]['std']:.4f}")
        console.print(table)
    else:
        from brics_cli.eval.generative import summary_rows

        n_ref = f" vs {proto['n_reference']} reference" if proto["n_reference"] else ""
        table = Table(title=f"{proto['n_generated']} generated{n_ref} images")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for label, value in summary_rows(result):
            table.add_row(label, value)
        console.print(table)
    console.print(f"written to {out}")
