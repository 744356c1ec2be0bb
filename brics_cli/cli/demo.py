"""`brics demo`: shard -> ae-train -> reconstruct -> diffusion-train -> sample -> eval -> nn-search -> report."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from brics_cli.cli.output import emit_json


def demo(
    out: Path = typer.Option(Path("runs/demo-pipeline"), "--out", help="Folder for shards, runs, outputs and the report."),
    quick: bool = typer.Option(False, "--quick", help="A 2-minute version (fewer crops and steps), as the test suite runs it."),
    json_output: bool = typer.Option(False, "--json", help="Print the report summary as one JSON object on stdout."),
) -> None:
    """Run the whole pipeline on the photos scikit-image ships, on the CPU, and write OUT/report.html.

    Each stage is the real command, logged to OUT/logs/STAGE.log; rerunning resumes.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from brics_cli.demo import plan, run_demo

    console = Console(file=sys.stderr)
    names = [s.name for s in plan(out, quick)]
    with Progress(TextColumn("[bold]demo[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stage]}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("demo", total=len(names), stage=names[0])

        def on_stage(stage, i, total):
            what = f"skipped ({stage.optional_reason})" if stage.status == "skipped" else f"{stage.seconds:6.1f} s"
            bar.console.print(f"[{i + 1}/{total}] {stage.name:<16} {what}")
            bar.update(task, advance=1, stage=names[i + 1] if i + 1 < total else "report")

        summary = run_demo(out, quick, on_stage)
    if json_output:
        emit_json(summary)
        return
    r = summary["reconstruction"]
    print(f"PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f} on {r['images']} held-out crops; "
          f"{summary['seconds']:.0f} s in all; report: {summary['report']}")
