"""`brics eval fid|clip-fid|fd-dinov2|is|kid|prc|all|recon|stats`: the paper's metrics with their protocol
(Tables 2, 4, 5), FD-DINOv2, and reference statistics written once."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from brics_cli.cli.output import emit_json, renamed

def eval_command(
    metric: str = typer.Argument(
        ..., help="fid | clip-fid | fd-dinov2 | is | kid | prc | all (every generative metric) | recon | stats (reference statistics)."
    ),
    samples: Optional[Path] = typer.Option(
        None, "--samples", help="`brics sample` output (recon: `brics reconstruct` output). Default: the newest that a run under --runs recorded (wherever --out put it) or that lies below it."
    ),
    ref: Optional[str] = typer.Option(
        None, "--ref", help="Reference shard folder or image folder. Default: the training data recorded for the samples."
    ),
    split: str = typer.Option("train", "--split", help="Split of the reference shards (the paper: train)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use the first N generated images (default: all)."),
    ref_limit: Optional[int] = typer.Option(None, "--ref-limit", help="Use the first N reference images (default: all)."),
    batch: int = typer.Option(64, "--batch", help="Images per forward pass."),
    workers: int = typer.Option(0, "--workers", help="DataLoader workers decoding images."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="The runs whose recorded outputs (and the folders below) are searched when --samples is not given."),
    lpips_net: str = typer.Option("alex", "--lpips-net", help="recon: LPIPS backbone alex (the paper's evaluation) | vgg | none."),
    ref_stats: Optional[Path] = typer.Option(
        None, "--ref-stats", help="Compare with reference statistics written by `brics eval stats` instead of --ref images."
    ),
    seed_sets: Optional[int] = typer.Option(
        None, "--seed-sets", help="Split the samples into K disjoint sets (index order); report mean, std, min over them (EDM2)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="stats: the statistics file to write (FILE.npz)."),
    networks: Optional[List[str]] = typer.Option(
        None, "--networks", help="stats: inception, clip, dinov2, vgg16 (repeat or comma-separate). Default: every one whose weights are present."
    ),
    moments_only: bool = typer.Option(False, "--moments-only", help="stats: store means and covariances only (no KID / prc features)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    old_n: Optional[int] = typer.Option(None, "--n", hidden=True),
    old_n_ref: Optional[int] = typer.Option(None, "--n-ref", hidden=True),
) -> None:
    """Measure generated images like the paper's Tables 4/5 (FID, IS, KID and precision/recall through
    torch-fidelity; CLIP-FID through clean-fid; FD-DINOv2 as EDM2), or reconstructions like Table 2 (PSNR,
    SSIM, LPIPS). The result, with its protocol, is also written to DIR/eval-METRIC.json. `stats` writes a
    reference's statistics once (--ref ... --out FILE.npz) for --ref-stats. Under torchrun the ranks
    share the images and give the numbers of one process."""
    from brics_cli.eval.commands import run_eval

    listed = [part for item in networks or [] for part in item.split(",") if part] if networks is not None else None
    n, n_ref = renamed(limit, old_n, "--limit", "--n"), renamed(ref_limit, old_n_ref, "--ref-limit", "--n-ref")
    written = run_eval(metric, samples, ref, split=split, n=n, n_ref=n_ref, batch=batch, workers=workers, device=device,
                       runs=runs, lpips_net=lpips_net, ref_stats=ref_stats, seed_sets=seed_sets, out=out, networks=listed,
                       moments_only=moments_only)
    if written is None:  # under torchrun, not rank 0: rank 0 prints
        return
    result, written_to = written
    if json_output:
        emit_json(result)
    elif metric == "stats":
        _print_stats(result)
    else:
        _print(metric, result, written_to)


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
    elif "seed_sets" in result:
        from brics_cli.eval.generative import seed_set_rows

        sets = result["seed_sets"]
        table = Table(title=f"{sets['k']} seed sets of {sets['set_size']} generated images vs {proto['n_reference']} reference")
        for column in ("metric", "mean", "std", "min", "per set"):
            table.add_column(column, justify="left" if column in ("metric", "per set") else "right")
        for row in seed_set_rows(result):
            table.add_row(*row)
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


def _print_stats(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    prov = result["provenance"]
    table = Table(title=f"reference statistics of {prov['reference']['n_images']} images")
    for column in ("array", "shape"):
        table.add_column(column)
    for key, shape in result["arrays"].items():
        table.add_row(key, " x ".join(map(str, shape)))
    console.print(table)
    for name, why in prov["skipped"].items():
        console.print(f"skipped {name}: {why}")
    console.print(f"written to {result['stats']}")
    if result["cleanfid"]:
        console.print(f"clean-fid custom CLIP statistics in {result['cleanfid']}/ (copy into clean-fid's stats folder to use them there)")
