"""`brics eval fid|clip-fid|is|kid|prc|all|recon`: the paper's metrics with their protocol (Tables 2, 4, 5)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from brics_cli.cli.output import emit_json

METRICS = ("fid", "clip-fid", "is", "kid", "prc", "all", "recon")


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
    The result, with its protocol, is also written to DIR/eval-METRIC.json."""
    from brics_cli.errors import ConfigError

    if metric not in METRICS:
        raise ConfigError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    if batch < 1 or (n is not None and n < 1) or (n_ref is not None and n_ref < 1):
        raise ConfigError("--batch, --n and --n-ref must be >= 1")
    if metric == "recon":
        result, folder = _recon(samples, lpips_net, batch, device)
    else:
        result, folder = _generative(metric, samples, ref, split, n, n_ref, batch, workers, device, runs)
    from brics_cli.data.shards import write_json_atomic

    out = folder / f"eval-{metric}.json"
    write_json_atomic(out, result)
    if json_output:
        emit_json(result)
    else:
        _print(metric, result, out)


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _generative(metric, samples, ref, split, n, n_ref, batch, workers, device, runs):
    from brics_cli.eval import weights
    from brics_cli.eval.generative import expand, required_weights
    from brics_cli.eval.sources import load_samples, newest_samples, recorded_reference

    names = expand(metric)
    folder = samples if samples is not None else newest_samples(runs)
    sample_set = load_samples(folder, n)
    if samples is None:
        _say(f"samples: {folder} (newest `brics sample` output under {runs}/)")
    weights.require_all(required_weights(names))  # stop before any work when a file is missing
    recorded = recorded_reference(sample_set)
    needs_reference = names != ["is"]
    if needs_reference and ref is None and recorded is None:
        from brics_cli.errors import ConfigError

        raise ConfigError(f"no training data recorded for {folder} (manifest 'data' or the run's config.yaml data.shards); pass --ref SHARDS")
    ref_path = ref if ref is not None else recorded
    is_recorded = recorded is not None and Path(ref_path).resolve() == Path(recorded).resolve()

    from brics_cli.cli.progress import lazy_bar, resolve_device, stage_progress
    from brics_cli.eval.generative import evaluate
    from brics_cli.eval.sources import load_reference

    dev = resolve_device(device)
    with stage_progress() as start:
        reference = None
        if needs_reference:
            reference = load_reference(ref_path, split, n_ref, lazy_bar(start, "export reference"))
            picked = "" if ref is not None else " (training data recorded for the samples)"
            _say(f"reference: {reference.describe()}{picked}")
        result = evaluate(names, sample_set, reference, device=dev, batch_size=batch, workers=workers,
                          reference_is_recorded=is_recorded, progress=start)
    for departure in result["protocol"]["departures"]:
        _say(f"warning: protocol differs from the paper's: {departure}")
    return result, folder


def _recon(samples, lpips_net, batch, device):
    from brics_cli.errors import ConfigError
    from brics_cli.eval import weights
    from brics_cli.eval.sources import newest_reconstruction

    if lpips_net not in ("alex", "vgg", "none"):
        raise ConfigError(f"--lpips-net must be alex, vgg or none, got '{lpips_net}'")
    folder = samples if samples is not None else newest_reconstruction()
    if samples is None:
        _say(f"reconstructions: {folder} (newest folder with inputs/ and recon/)")
    weights.require_all([] if lpips_net == "none" else weights.LPIPS_WEIGHTS[lpips_net])  # before any work

    from brics_cli.cli.progress import resolve_device, stage_progress
    from brics_cli.eval.recon import evaluate_folder

    with stage_progress() as start:
        return evaluate_folder(folder, lpips_net, resolve_device(device), batch, progress=start), folder


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
