"""The two training stages as the CLI starts them: set up the runtime, build, resume, run.

`train_autoencoder` and `train_diffusion` take a loaded recipe (`brics_cli.recipe.Recipe`, which
sits above this package) and return the plan (with `dry_run`) or the result that `brics ae-train`
/ `brics diffusion-train` print; both write `config.yaml` and `result.json` into the run folder.
To resume, run the same command again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from brics_cli.config import to_dict
from brics_cli.core.checkpoint import UnusableCheckpoint
from brics_cli.core.files import atomic_write_json, atomic_write_text, remove_stale_temporaries
from brics_cli.core.locks import folder_lock
from brics_cli.core.runtime import Runtime, resolve_device, setup_runtime
from brics_cli.errors import BricsError
from brics_cli.train.preflight import PrerequisitesMissing, ae_train_missing, as_json, diffusion_train_missing


def _write_config(folder: Path, cfg) -> None:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _resume(trainer, folder: Path, announce: bool) -> None:
    """Resume from the newest checkpoint that is usable; one line for each newer one skipped, and why."""
    skipped: list[str] = []
    for path in trainer.checkpoints.newest_first():
        try:
            trainer.resume(path)
        except UnusableCheckpoint as exc:  # truncated, unreadable, damaged metadata, weights that fail the check
            skipped.append(str(exc))
            if announce:
                print(f"warning: skipped {exc}; trying the checkpoint before it", file=sys.stderr)
            continue
        if announce:
            print(f"resuming {folder} from step {trainer.step} ({path.name})", file=sys.stderr)
        return
    if skipped:  # there are checkpoints, none usable: starting over would overwrite them
        raise BricsError(f"{trainer.checkpoints.folder}: no usable checkpoint ({len(skipped)} tried; newest: {skipped[0]}); "
                         "move the folder away to start over")


def _train(trainer, folder: Path, cfg, rt: Runtime) -> dict[str, Any] | None:
    """Resume from the newest usable checkpoint, record the config, train; the result on rank 0."""
    if rt.is_main:
        for sub in ("", "samples", "checkpoints"):  # the temporaries of a run that was killed mid-write
            remove_stale_temporaries(folder / sub)
    _resume(trainer, folder, announce=rt.is_main)
    if rt.is_main:
        _write_config(folder, cfg)
    result = trainer.run(show_progress=True)
    if not rt.is_main:
        return None
    atomic_write_json(folder / "result.json", result)
    return result


def train_autoencoder(cfg, recipe: Path, run_dir: Path | None, device: str, dry_run: bool) -> dict[str, Any] | None:
    """`brics ae-train`: the plan (dry run) or the result on rank 0; None on the other ranks."""
    from brics_cli.train.ae import AETrainer
    from brics_cli.train.perceptual import build_perceptual

    folder = run_dir or Path(cfg.run.dir) / "ae"
    resolve_device(device)  # a wrong --device is a usage error before anything is looked up
    missing = ae_train_missing(cfg, folder)  # everything the run needs, reported at once, before any work
    if missing and not dry_run:
        raise PrerequisitesMissing("ae-train", missing)
    rt = setup_runtime(device)
    try:
        perceptual = None if missing else build_perceptual(cfg.ae.loss, rt.device)
        trainer = AETrainer(cfg, folder, rt, perceptual)
        if dry_run:
            _resume(trainer, folder, announce=False)  # the plan says where it would start
            return {"dry_run": True, **_ae_plan(recipe, folder, cfg, rt, trainer, perceptual), "missing": as_json(missing)}
        with folder_lock(folder, rt):  # one writer per run folder
            return _train(trainer, folder, cfg, rt)
    finally:
        rt.shutdown()


def _ae_plan(recipe, folder, cfg, rt, trainer, perceptual) -> dict[str, Any]:
    return {
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
        "perceptual": "none" if cfg.ae.loss.perceptual == 0 else cfg.ae.loss.perceptual_type,
        "gan": cfg.ae.loss.gan,
    }


def train_diffusion(cfg, recipe: Path, ae_run: Path | None, run_dir: Path | None, device: str,
                    dry_run: bool) -> dict[str, Any] | None:
    """`brics diffusion-train`: encode the data once (cached), then train the UNet on the codes."""
    from brics_cli.train.diffusion import DiffusionTrainer, codes_key

    resolve_device(device)  # a wrong --device is a usage error before anything is looked up
    cfg.check_stage("diffusion")
    folder = run_dir or Path(cfg.run.dir) / "diffusion"
    missing, ae_ckpt = diffusion_train_missing(cfg, recipe, ae_run, folder)  # all at once, before any work
    if missing and not dry_run:
        raise PrerequisitesMissing("diffusion-train", missing)
    rt = setup_runtime(device)
    try:
        tc = cfg.diffusion.train
        micro, accum = tc.accumulation(rt.world_size)  # a batch the ranks cannot split stops here, before the encode
        key = codes_key(ae_ckpt, cfg.data.shards, cfg.data.flip) if ae_ckpt is not None and not missing else None
        codes_dir = Path(cfg.run.dir) / "codes" / key if key else None
        if dry_run:
            return {"dry_run": True, "recipe": str(recipe), "run": str(folder), "ae_checkpoint": str(ae_ckpt) if ae_ckpt else None,
                    "codes": str(codes_dir) if codes_dir else None, "codes_cached": bool(codes_dir and (codes_dir / "done.json").is_file()),
                    "device": str(rt.device), "ranks": rt.world_size, "steps": tc.steps, "batch": tc.batch, "micro_batch": micro,
                    "accumulation": accum, "bf16": tc.bf16, "compile": tc.compile, "missing": as_json(missing)}
        with folder_lock(folder, rt):  # one writer per run folder
            codes, info = _cached_codes(cfg, ae_ckpt, codes_dir, rt)
            trainer = DiffusionTrainer(cfg, folder, rt, ae_ckpt, codes, {**info, "dir": str(codes_dir), "key": key})
            return _train(trainer, folder, cfg, rt)
    finally:
        rt.shutdown()


def _cached_codes(cfg, ae_ckpt: Path, codes_dir: Path, rt: Runtime):
    """The training split's key codes from the (locked) cache: encoded once, every rank its share
    of the parts, then read back whole by every rank."""
    from brics_cli.models.autoencoder import BRICSAutoencoder
    from brics_cli.train.diffusion import encode_dataset, read_code_cache

    with folder_lock(codes_dir, rt):
        if not (codes_dir / "done.json").is_file():  # no rank writes it before all have looked: see encode_dataset
            if rt.is_main:
                print(f"encoding {cfg.data.shards} with {ae_ckpt} -> {codes_dir} on {rt.world_size} rank(s)", file=sys.stderr)
            ae = BRICSAutoencoder.from_checkpoint(ae_ckpt, ema=True, device=rt.device)
            encode_dataset(ae, cfg.data, codes_dir, rt)
            del ae
        return read_code_cache(codes_dir)
