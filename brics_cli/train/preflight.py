"""Preflight: what a training command needs, checked before any work and reported all at once.

`brics ae-train` needs its training shards, the perceptual loss's weight files and a writable run
folder; `brics diffusion-train` needs an autoencoder checkpoint, the shards (unless its key codes
are cached already) and a writable run folder. Each missing item is one line with what fixes it,
so a user learns everything in one try instead of one failure per attempt. `--dry-run` prints the
same list as `missing` next to the plan (exit 2 when it is not empty).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from brics_cli.errors import BricsError, Missing, PrerequisitesMissing

__all__ = ["Missing", "PrerequisitesMissing", "ae_train_missing", "as_json", "diffusion_train_missing", "missing_weights"]


def as_json(missing: list[Missing]) -> list[dict[str, str]]:
    return [asdict(m) for m in missing]


def perceptual_weights(loss_cfg) -> list[str]:
    """The weight files the recipe's perceptual loss loads (none when it is off)."""
    if loss_cfg.perceptual_type == "none" or loss_cfg.perceptual == 0:
        return []
    if loss_cfg.perceptual_type == "lpips-vgg":
        from brics_cli.nets.perceptual import LPIPS_WEIGHTS

        return list(LPIPS_WEIGHTS["vgg"])
    return ["vgg16"]


def missing_weights(names: list[str]) -> list[Missing]:
    from brics_cli.nets.weights import missing

    return missing(names)


def missing_shards(data_cfg) -> list[Missing]:
    """The training split of data.shards: a `brics shard` folder, or a pattern of local or remote shards."""
    from brics_cli.data.loader import shard_urls

    try:
        shard_urls(data_cfg.shards, "train")
    except BricsError as exc:
        return [Missing(f"data.shards: {data_cfg.shards}", _shard_fix(data_cfg.shards, str(exc)))]
    return []


def _shard_fix(shards: str, problem: str) -> str:
    if "manifest" in problem or "no 'train' shards" in problem:
        return problem.split(": ", 1)[-1]  # a folder that is not (or not yet) a finished shard folder: its own words
    return f"make it with `brics shard SOURCE ... --out {shards}` (sources: `brics shard --help`) or set data.shards=PATH"


def unwritable(folder: Path) -> list[Missing]:
    """The run folder, or the nearest folder above it that exists, must be writable."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK):
        return []
    return [Missing(f"run folder {folder}: {probe} is not a writable folder", "choose another --out / run.dir")]


def ae_train_missing(cfg, folder: Path) -> list[Missing]:
    return [*missing_shards(cfg.data), *missing_weights(perceptual_weights(cfg.ae.loss)), *unwritable(folder)]


def diffusion_train_missing(cfg, recipe, ae_run: Path | None, folder: Path) -> tuple[list[Missing], Path | None]:
    """(what is missing, the AE checkpoint when there is one). The shards are needed only while the
    key codes of that checkpoint are not cached."""
    from brics_cli.train.diffusion import codes_key, find_ae_checkpoint

    missing: list[Missing] = []
    try:
        ae_ckpt = find_ae_checkpoint(cfg, ae_run)
    except BricsError as exc:
        ae_ckpt = None
        missing.append(Missing(f"autoencoder checkpoint: {str(exc).split(': ', 1)[0]}",
                               f"train one with `brics ae-train {recipe}` first, or pass --ae RUN_OR_CHECKPOINT"))
    shards = missing_shards(cfg.data)
    if shards and ae_ckpt is not None:
        try:
            cached = (Path(cfg.run.dir) / "codes" / codes_key(ae_ckpt, cfg.data.shards, cfg.data.flip) / "done.json").is_file()
        except (OSError, BricsError):
            cached = False
        shards = [] if cached else shards
    return [*missing, *shards, *unwritable(folder)], ae_ckpt
