"""Run folders: how a command finds the run, checkpoint or output folder it reads.

A recipe's `run.dir` (e.g. `runs/demo`) holds one folder per stage -- `ae/`, `codes/`,
`diffusion/` -- each with `checkpoints/step-NNNNNN.safetensors`, `config.yaml`, `metrics.jsonl`
and `result.json`. Every command that reads a model accepts the run root, the stage folder or a
checkpoint file (`find_checkpoint`). Without one, commands take the newest run under `runs/` and
say which; `brics eval` and `brics nn-search` likewise take the newest `brics sample` output
(`newest_samples`) and the newest `brics reconstruct` output (`newest_reconstruction`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from brics_cli.core.checkpoint import CheckpointDir
from brics_cli.errors import BricsError, ConfigError

STAGE_COMMANDS = {"ae": "brics ae-train", "diffusion": "brics diffusion-train"}
SAMPLE_KEYS = ("run", "checkpoint_sha256", "sampler", "steps", "seed", "count", "files")  # of a `brics sample` manifest
SEARCH_DEPTH = 4


def find_checkpoint(path: Path, stage: str) -> Path:
    """The newest `stage` checkpoint at `path`: a checkpoint file, a stage folder or a run root."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path / "checkpoints", path / stage / "checkpoints"):
        latest = CheckpointDir(folder).latest()
        if latest is not None:
            return latest
    raise BricsError(
        f"{path}: no {stage} checkpoint found (expected {path}/checkpoints/step-NNNNNN.safetensors "
        f"or {path}/{stage}/checkpoints/...); run `{STAGE_COMMANDS[stage]}` first"
    )


def newest_run(stage: str, root: Path = Path("runs")) -> Path | None:
    """The `stage` folder under `root` whose newest checkpoint was written last."""
    found = [p for p in Path(root).glob("**/checkpoints/step-*.safetensors") if p.parent.parent.name == stage]
    return max(found, key=lambda p: p.stat().st_mtime).parent.parent if found else None


def checkpoint_to_read(run: Path | None, stage: str, how_to_pass: str) -> Path:
    """The checkpoint a command reads: from `run` (run root, stage folder or file), else from the
    newest `stage` run under runs/, saying which on stderr."""
    if run is None:
        run = newest_run(stage)
        if run is None:
            raise BricsError(f"no {stage} run found under runs/; {how_to_pass} (train one with `{STAGE_COMMANDS[stage]}`)")
        print(f"using the newest {stage} run: {run}", file=sys.stderr)
    return find_checkpoint(run, stage)


def run_of_checkpoint(checkpoint: Path) -> Path:
    """The stage folder a checkpoint belongs to (`.../ae/checkpoints/step-N.safetensors` -> `.../ae`)."""
    return Path(checkpoint).parent.parent


def _find(root: Path, name: str) -> list[Path]:
    """`root/name`, `root/*/name`, ... down to SEARCH_DEPTH levels below root."""
    return [p for depth in range(SEARCH_DEPTH + 1) for p in Path(root).glob("/".join(["*"] * depth + [name]))]


def is_sample_manifest(obj) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in SAMPLE_KEYS)


def newest_samples(root: Path = Path("runs")) -> Path:
    """The folder of the newest `brics sample` manifest under `root` (depth <= 4)."""
    found = []
    for manifest in _find(root, "manifest.json"):
        try:
            if is_sample_manifest(json.loads(manifest.read_text())):
                found.append(manifest)
        except (OSError, ValueError):
            continue
    if not found:
        raise ConfigError(f"no `brics sample` output under {root}/ (a manifest.json with {', '.join(SAMPLE_KEYS)}); pass --samples DIR")
    return max(found, key=lambda p: p.stat().st_mtime_ns).parent


def newest_reconstruction(root: Path = Path(".")) -> Path:
    """The newest folder holding inputs/ and recon/: ./recon itself or below it, or below ./runs (depth <= 4)."""
    found = [p.parent for base in (root / "recon", root / "runs") for p in _find(base, "inputs") if (p.parent / "recon").is_dir()]
    if not found:
        raise ConfigError("no `brics reconstruct` output found (a folder with inputs/ and recon/ under ./recon or ./runs); pass --samples DIR")
    return max(found, key=lambda p: (p / "recon").stat().st_mtime_ns)
