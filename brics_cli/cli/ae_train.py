"""`brics ae-train RECIPE [key=value ...]`: train the bi-level autoencoder (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from brics_cli.cli.output import emit_json, finish_plan, renamed


def ae_train(
    recipe: Path = typer.Argument(..., help="A recipe file or preset name (`brics recipes list`), e.g. demo or my.yaml."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Overrides `section.key=value`, e.g. ae.train.steps=500."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: RUN.DIR/ae from the recipe)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto. Under torchrun each rank takes its LOCAL_RANK GPU."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build everything, print the plan, train nothing."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
    old_run_dir: Optional[Path] = typer.Option(None, "--run-dir", hidden=True),
) -> None:
    """Train encoder, grids, F_mlp and decoder against the discriminator (paper Sec. 3.3).

    Rerunning the same command resumes from the newest checkpoint; Ctrl-C (SIGINT) or SIGTERM
    writes a checkpoint and exits 0. Launch with `torchrun --nproc_per_node N brics ae-train ...`
    for data-parallel training.
    """
    from brics_cli.recipe import load_recipe
    from brics_cli.train.launch import train_autoencoder

    result = train_autoencoder(load_recipe(recipe, overrides or []), recipe, renamed(out, old_run_dir, "--out", "--run-dir"),
                               device, dry_run)
    if result is None:  # not rank 0
        return
    if dry_run:
        finish_plan(result, json_output, width=20)
    elif json_output:
        emit_json(result)
    else:
        print_training_result(result)


def print_training_result(result: dict) -> None:
    line = f"step {result['step']}/{result['steps']} in {result['seconds']:.0f} s -> {result['checkpoint']}"
    if result.get("stopped_by"):
        line += f" (stopped by {result['stopped_by']}; rerun to continue)"
    print(line)
    ev = result.get("eval")
    if ev:
        print(f"EMA on {ev['n']} held-out images: PSNR {ev['psnr']['mean']:.2f} dB, SSIM {ev['ssim']['mean']:.4f}")
