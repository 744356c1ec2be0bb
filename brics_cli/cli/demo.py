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
    from brics_cli.core.progress import Progress
    from brics_cli.demo import plan, run_demo

    names = [s.name for s in plan(out, quick)]
    with Progress() as progress:
        task = progress.task("demo", len(names), unit="stages")

        def on_stage(stage, i, total):
            what = {"skipped": f"skipped ({stage.optional_reason})", "stopped": "stopped: it saved its state"}.get(
                stage.status, f"{stage.seconds:6.1f} s")
            progress.log(f"[{i + 1}/{total}] {stage.name:<16} {what}")
            task.advance(1)

        summary = run_demo(out, quick, on_stage)
    if json_output:
        emit_json(summary)
        return
    if summary.get("stopped"):
        print(f"stopped by {summary['signal']} during {summary['stage']}; rerun the same `brics demo` to continue", file=sys.stderr)
        return
    r = summary["reconstruction"]
    print(f"PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f} on {r['images']} held-out crops; "
          f"{summary['seconds']:.0f} s in all; report: {summary['report']}")
