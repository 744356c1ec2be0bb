"""`brics demo`: the whole pipeline on the demo photos, each stage the real command, then a report.

    shard demo -> ae-train -> reconstruct --usage -> diffusion-train -> sample -> eval recon
    (-> eval all when the metric weights are present) -> nn-search

Every stage runs `python -m brics_cli <command> ... --json` in a subprocess -- the code path a
user runs by hand -- with its progress and messages in `OUT/logs/<stage>.log`, and its JSON result
kept for the report. Every command resumes by itself, so rerunning `brics demo` continues where
it stopped and repeats only what is cheap. The report (`report.html`, self-contained, and
`report.md` with the figures next to it) shows the training crops, reconstructions with PSNR/SSIM,
grid usage, loss curves, samples, nearest neighbours, stage timings, the machine and the commands.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from brics_cli.demo.report import write_report
from brics_cli.demo.stages import RECIPE, Stage, demo_recipe, generative_weights_missing, lpips_flag, plan, relative, run_stage

__all__ = ["RECIPE", "Stage", "demo_recipe", "generative_weights_missing", "lpips_flag", "plan", "relative", "run_demo",
           "run_stage", "write_report"]


def run_demo(out: Path, quick: bool, on_stage: Callable[[Stage, int, int], None] | None = None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    stages = plan(out, quick)
    env = dict(os.environ)
    t0 = time.perf_counter()
    for i, stage in enumerate(stages):
        run_stage(stage, out, env)
        if on_stage is not None:
            on_stage(stage, i, len(stages))
        if stage.status == "stopped":  # the stage saved its state: a rerun of `brics demo` continues from it
            return {"stopped": True, "stage": stage.name, "signal": stage.extra["signal"], "log": str(stage.log)}
    total = time.perf_counter() - t0
    summary = write_report(out, stages, quick, total)
    return summary
