"""`brics nn-search`: each sample's k nearest training images (Fig. 8), as nn.json and a contact sheet."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from brics_cli.cli.output import emit_json


def nn_search_command(
    samples: Optional[Path] = typer.Option(None, "--samples", help="`brics sample` output. Default: the newest under --runs."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Training shard folder or image folder. Default: the data recorded for the samples."),
    split: str = typer.Option("train", "--split", help="Split of the reference shards."),
    k: int = typer.Option(5, "--k", help="Neighbours per sample."),
    queries: int = typer.Option(64, "--queries", help="Search for the first N samples (fewer if the folder holds fewer)."),
    metric: str = typer.Option("lpips", "--metric", help="lpips (the paper's, needs AlexNet weights) | l2 (no weights)."),
    candidates: int = typer.Option(64, "--candidates", help="Images re-ranked exactly per sample after the embedding stage."),
    exact: bool = typer.Option(False, "--exact", help="Brute force: the exact distance to every reference image."),
    grid_rows: int = typer.Option(16, "--grid-rows", help="Samples shown in nn-grid.png."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder for nn.json and nn-grid.png (default: the samples folder)."),
    batch: int = typer.Option(64, "--batch", help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where to look for the newest samples when --samples is not given."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> None:
    """For each sample, its k nearest training images: a cheap lower-bound embedding picks --candidates images
    with blockwise matrix products, their exact distance (LPIPS-AlexNet or L2) re-ranks them; --exact is brute
    force. Writes nn.json {"metric", "k", "queries": [{"sample", "neighbours": [{"key", "distance"}]}]} and nn-grid.png."""
    from brics_cli.errors import ConfigError
    from brics_cli.eval.sources import load_samples, newest_samples, recorded_reference

    if metric not in ("lpips", "l2"):
        raise ConfigError(f"--metric must be lpips or l2, got '{metric}'")
    if k < 1 or candidates < 1 or batch < 1 or queries < 1:
        raise ConfigError("--k, --candidates, --batch and --queries must be >= 1")
    folder = samples if samples is not None else newest_samples(runs)
    if samples is None:
        print(f"samples: {folder} (newest `brics sample` output under {runs}/)", file=sys.stderr)
    sample_set = load_samples(folder, queries, strict=False)
    from brics_cli.eval import weights

    weights.require_all(weights.LPIPS_WEIGHTS["alex"] if metric == "lpips" else ())  # before any work
    recorded = recorded_reference(sample_set)
    if ref is None and recorded is None:
        raise ConfigError(f"no training data recorded for {folder}; pass --ref SHARDS")

    from brics_cli.cli.progress import lazy_bar, resolve_device, stage_progress
    from brics_cli.data.shards import write_json_atomic
    from brics_cli.eval.nn_search import find_neighbours
    from brics_cli.eval.sources import load_reference

    dev = resolve_device(device)
    with stage_progress() as start:
        reference = load_reference(ref or recorded, split, None, lazy_bar(start, "export reference"))
        print(f"reference: {reference.describe()}", file=sys.stderr)
        report, sheet = find_neighbours(sample_set, reference, metric, k=k, candidates=candidates, exact=exact, batch=batch,
                                        device=dev, grid_rows=grid_rows, progress=start)
    out = out or folder
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "nn.json", report)
    sheet.save(out / "nn-grid.png")
    s = report["search"]
    if json_output:
        emit_json({"out": str(out), "queries": len(report["queries"]),
                   **{key: s[key] for key in ("mode", "candidates", "exact_distances", "brute_force_distances", "certified")}})
    else:
        print(f"{len(report['queries'])} samples x {report['k']} neighbours ({metric}, {s['mode']}): {s['exact_distances']} exact "
              f"distances of {s['brute_force_distances']} for brute force; {s['certified']} certified exact; "
              f"wrote {out / 'nn.json'} and {out / 'nn-grid.png'}")
