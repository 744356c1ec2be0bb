"""`brics nn-search`: each sample's k nearest training images (Fig. 8), as nn.json and a contact sheet."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from brics_cli.cli.output import emit_json, renamed


def nn_search_command(
    samples: Optional[Path] = typer.Option(None, "--samples", help="`brics sample` output. Default: the newest that a run under --runs recorded (wherever --out put it) or that lies below it."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Training shard folder or image folder. Default: the data recorded for the samples."),
    split: str = typer.Option("train", "--split", help="Split of the reference shards."),
    k: int = typer.Option(5, "--k", help="Neighbours per sample."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Search for the first N samples (default 64; fewer if the folder holds fewer)."),
    metric: str = typer.Option("lpips", "--metric", help="lpips (the paper's, needs AlexNet weights) | l2 (no weights)."),
    candidates: int = typer.Option(64, "--candidates", help="Images re-ranked exactly per sample after the embedding stage."),
    exact: bool = typer.Option(False, "--exact", help="Brute force: the exact distance to every reference image."),
    grid_rows: int = typer.Option(16, "--grid-rows", help="Samples shown in nn-grid.png."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder for nn.json and nn-grid.png (default: the samples folder)."),
    batch: int = typer.Option(64, "--batch", help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="The runs whose recorded outputs (and the folders below) are searched when --samples is not given."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    old_queries: Optional[int] = typer.Option(None, "--queries", hidden=True),
) -> None:
    """For each sample, its k nearest training images: a cheap lower-bound embedding picks --candidates images
    with blockwise matrix products, their exact distance (LPIPS-AlexNet or L2) re-ranks them; --exact is brute
    force. Writes nn.json {"metric", "k", "queries": [{"sample", "neighbours": [{"key", "distance"}]}]} and nn-grid.png.
    Under torchrun the ranks share the search and give the neighbours of one process."""
    from brics_cli.eval.commands import run_nn_search

    queries = renamed(limit, old_queries, "--limit", "--queries")
    queries = 64 if queries is None else queries  # `--limit 0` stays a usage error
    written = run_nn_search(samples, ref, split=split, k=k, queries=queries, metric=metric, candidates=candidates,
                            exact=exact, grid_rows=grid_rows, out=out, batch=batch, device=device, runs=runs)
    if written is None:  # under torchrun, not rank 0: rank 0 prints
        return
    report, out = written
    s = report["search"]
    if json_output:
        emit_json({"out": str(out), "queries": len(report["queries"]),
                   **{key: s[key] for key in ("mode", "candidates", "exact_distances", "brute_force_distances", "certified", "unreadable")}})
    else:
        print(f"{len(report['queries'])} samples x {report['k']} neighbours ({metric}, {s['mode']}): {s['exact_distances']} exact "
              f"distances of {s['brute_force_distances']} for brute force; {s['certified']} certified exact; "
              f"wrote {out / 'nn.json'} and {out / 'nn-grid.png'}")
