"""`brics diffusion-train RECIPE [key=value ...]`: the diffusion model on the autoencoder's key codes."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from brics_cli.cli.ae_train import print_training_result
from brics_cli.cli.output import emit_json, finish_plan, renamed


def diffusion_train(
    recipe: Path = typer.Argument(..., help="A recipe file or preset name (`brics recipes list`), e.g. demo or my.yaml."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Overrides `section.key=value`, e.g. diffusion.train.steps=500."),
    ae: Optional[Path] = typer.Option(None, "--ae", help="The autoencoder: a run root, its ae/ folder or a checkpoint (default: RUN.DIR/ae)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: RUN.DIR/diffusion)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Find the AE and the data, print the plan, train nothing."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
    old_run_dir: Optional[Path] = typer.Option(None, "--run-dir", hidden=True),
    old_ae_run: Optional[Path] = typer.Option(None, "--ae-run", hidden=True),
) -> None:
    """Encode the dataset once with the frozen EMA autoencoder (cached), then train the UNet on x0 = 2z - 1.

    Rerunning resumes from the newest checkpoint; SIGINT/SIGTERM checkpoint and exit 0; torchrun
    gives data-parallel training.
    """
    from brics_cli.recipe import load_recipe
    from brics_cli.train.launch import train_diffusion

    result = train_diffusion(load_recipe(recipe, overrides or []), recipe, renamed(ae, old_ae_run, "--ae", "--ae-run"),
                             renamed(out, old_run_dir, "--out", "--run-dir"), device, dry_run)
    if result is None:  # not rank 0
        return
    if dry_run:
        finish_plan(result, json_output, width=15)
    elif json_output:
        emit_json(result)
    else:
        print_training_result(result)
