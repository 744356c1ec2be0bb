"""`brics diffusion-train RECIPE [key=value ...]`: the diffusion model on the autoencoder's key codes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from brics_cli.cli.output import emit_json


def diffusion_train(
    recipe: Path = typer.Argument(..., help="Recipe YAML, e.g. recipes/demo.yaml."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Overrides `section.key=value`, e.g. diffusion.train.steps=500."),
    ae_run: Optional[Path] = typer.Option(None, "--ae-run", help="The autoencoder run (default: RUN.DIR/ae)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run folder (default: RUN.DIR/diffusion)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Find the AE and the data, print the plan, train nothing."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
) -> None:
    """Encode the dataset once with the frozen EMA autoencoder (cached), then train the UNet on x0 = 2z - 1.

    Rerunning resumes from the newest checkpoint; SIGINT/SIGTERM checkpoint and exit 0; torchrun
    gives data-parallel training.
    """
    import yaml

    from brics_cli.config import to_dict
    from brics_cli.recipe import load_recipe
    from brics_cli.train import checkpoint as ckpt
    from brics_cli.train.ae import load_autoencoder
    from brics_cli.train.diffusion import DiffusionTrainer, codes_key, encode_dataset, find_ae_checkpoint
    from brics_cli.train.runtime import setup_runtime

    cfg = load_recipe(recipe, overrides or [])
    folder = run_dir or Path(cfg.run.dir) / "diffusion"
    ae_ckpt = find_ae_checkpoint(cfg, ae_run)
    rt = setup_runtime(device)
    try:
        key = codes_key(ae_ckpt, cfg.data.shards, cfg.data.flip)
        codes_dir = Path(cfg.run.dir) / "codes" / key
        if dry_run:
            plan = {"dry_run": True, "recipe": str(recipe), "run": str(folder), "ae_checkpoint": str(ae_ckpt),
                    "codes": str(codes_dir), "codes_cached": (codes_dir / "done.json").is_file(), "device": str(rt.device),
                    "ranks": rt.world_size, "steps": cfg.diffusion.train.steps, "batch": cfg.diffusion.optim.batch}
            if json_output:
                emit_json(plan)
            else:
                for k, v in plan.items():
                    print(f"{k:>15}: {v}")
            return
        if rt.is_main:
            if not (codes_dir / "done.json").is_file():
                print(f"encoding {cfg.data.shards} with {ae_ckpt} -> {codes_dir}", file=sys.stderr)
            ae, _ = load_autoencoder(ae_ckpt, ema=True, device=rt.device)
            codes, info = encode_dataset(ae, cfg.data, codes_dir, rt.device)
            del ae
        rt.barrier()
        if not rt.is_main:
            codes, info = encode_dataset(None, cfg.data, codes_dir, rt.device)  # written by rank 0: read back
        info = {**info, "dir": str(codes_dir), "key": key}
        trainer = DiffusionTrainer(cfg, folder, rt, ae_ckpt, codes, info)
        latest = trainer.checkpoints.latest()
        if latest is not None:
            trainer.resume(latest)
            if rt.is_main:
                print(f"resuming {folder} from step {trainer.step} ({latest.name})", file=sys.stderr)
        if rt.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_bytes(folder / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
        result = trainer.run()
        if rt.is_main:
            ckpt.atomic_write_json(folder / "result.json", result)
            if json_output:
                emit_json(result)
            else:
                print(f"step {result['step']}/{result['steps']} in {result['seconds']:.0f} s -> {result['checkpoint']}"
                      + (f" (stopped by {result['stopped_by']}; rerun to continue)" if result["stopped_by"] else ""))
    finally:
        rt.shutdown()
