"""`brics ae-train RECIPE [key=value ...]`: train the bi-level autoencoder (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from brics_cli.cli.output import emit_json


def ae_train(
    recipe: Path = typer.Argument(..., help="Recipe YAML, e.g. recipes/demo.yaml."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Overrides `section.key=value`, e.g. ae.train.steps=500."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run folder (default: RUN.DIR/ae from the recipe)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto. Under torchrun each rank takes its LOCAL_RANK GPU."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build everything, print the plan, train nothing."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
) -> None:
    """Train encoder, grids, F_mlp and decoder against the discriminator (paper Sec. 3.3).

    Rerunning the same command resumes from the newest checkpoint; Ctrl-C (SIGINT) or SIGTERM
    writes a checkpoint and exits 0. Launch with `torchrun --nproc_per_node N brics ae-train ...`
    for data-parallel training.
    """
    import sys

    import yaml

    from brics_cli.config import to_dict
    from brics_cli.recipe import load_recipe
    from brics_cli.train import checkpoint as ckpt
    from brics_cli.train.ae import AETrainer
    from brics_cli.train.perceptual import build_perceptual
    from brics_cli.train.runtime import setup_runtime

    cfg = load_recipe(recipe, overrides or [])
    folder = run_dir or Path(cfg.run.dir) / "ae"
    rt = setup_runtime(device)
    try:
        perceptual = build_perceptual(cfg.ae.loss, rt.device)  # missing weights stop here, before any work
        trainer = AETrainer(cfg, folder, rt, perceptual)
        latest = trainer.checkpoints.latest()
        if latest is not None:
            trainer.resume(latest)
        plan = {
            "recipe": str(recipe),
            "run": str(folder),
            "device": str(rt.device),
            "ranks": rt.world_size,
            "batch": cfg.ae.train.batch,
            "micro_batch": trainer.micro,
            "accumulation": trainer.accum,
            "start_step": trainer.step,
            "steps": cfg.ae.train.steps,
            "params": sum(p.numel() for p in trainer.ae.parameters()),
            "discriminator_params": sum(p.numel() for p in trainer.disc.parameters()),
            "perceptual": cfg.ae.loss.perceptual_type if perceptual is not None else "none",
            "gan": cfg.ae.loss.gan,
        }
        if dry_run:
            if json_output:
                emit_json({"dry_run": True, **plan})
            else:
                for k, v in plan.items():
                    print(f"{k:>20}: {v}")
            return
        if rt.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_bytes(folder / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
            if trainer.step:
                print(f"resuming {folder} from step {trainer.step} ({latest.name})", file=sys.stderr)
        result = trainer.run(show_progress=True)
        if rt.is_main:
            ckpt.atomic_write_json(folder / "result.json", result)
            if json_output:
                emit_json(result)
            else:
                _print_result(result)
    finally:
        rt.shutdown()


def _print_result(result: dict) -> None:
    line = f"step {result['step']}/{result['steps']} in {result['seconds']:.0f} s -> {result['checkpoint']}"
    if result.get("stopped_by"):
        line += f" (stopped by {result['stopped_by']}; rerun to continue)"
    print(line)
    ev = result.get("eval")
    if ev:
        print(f"EMA on {ev['n']} held-out images: PSNR {ev['psnr']['mean']:.2f} dB, SSIM {ev['ssim']['mean']:.4f}")
