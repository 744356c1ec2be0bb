"""Run folders: how a command finds the run, checkpoint or output folder it reads.

A recipe's `run.dir` (e.g. `runs/demo`) holds one folder per stage -- `ae/`, `codes/`,
`diffusion/` -- each with `checkpoints/step-NNNNNN.safetensors`, `config.yaml`, `metrics.jsonl`
and `result.json`. Every command that reads a model accepts the run root, the stage folder or a
checkpoint file (`find_checkpoint`). Without one, commands take the newest run under `runs/` and
say which; `brics eval` and `brics nn-search` likewise take the newest `brics sample` output
(`newest_samples`) and the newest `brics reconstruct` output (`newest_reconstruction`): those the
runs recorded in their `outputs.json` (written by `brics sample` / `brics reconstruct`, wherever
`--out` put them) and those found below `runs/`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from brics_cli.core.checkpoint import CheckpointDir
from brics_cli.errors import ConfigError

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
    raise ConfigError(  # a missing prerequisite: exit 2
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
            raise ConfigError(f"no {stage} run found under runs/; {how_to_pass} (train one with `{STAGE_COMMANDS[stage]}`)")
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


OUTPUTS_INDEX = "outputs.json"  # in a stage folder: the output folders its commands wrote, wherever --out put them


def record_output(checkpoint: Path, kind: str, folder: Path) -> None:
    """Note in the checkpoint's stage folder (RUN/outputs.json) that `folder` holds `kind` output
    ("samples", "reconstructions") of it, so `brics eval` finds it without --samples even when --out
    put it outside runs/. Locked: two commands finishing at once both land. A checkpoint outside a
    run folder, or a run folder that cannot be written, records nothing (the index only helps)."""
    from filelock import FileLock

    from brics_cli.core.files import atomic_write_json

    if Path(checkpoint).parent.name != "checkpoints":
        return
    index = run_of_checkpoint(checkpoint) / OUTPUTS_INDEX
    try:
        with FileLock(str(index) + ".lock"):
            _add_entry(index, kind, folder, atomic_write_json)
    except OSError as exc:
        print(f"note: could not record {folder} in {index} ({exc.strerror}); pass it as --samples to brics eval", file=sys.stderr)


def _add_entry(index: Path, kind: str, folder: Path, write) -> None:
    entries = [e for e in _read_index(index) if Path(e["folder"]) != Path(folder).resolve()]
    entries.append({"kind": kind, "folder": str(Path(folder).resolve())})
    write(index, {"outputs": entries[-100:]})


def _read_index(index: Path) -> list[dict]:
    try:
        entries = json.loads(index.read_text())["outputs"]
        return [e for e in entries if isinstance(e, dict) and {"kind", "folder"} <= set(e)]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # absent or damaged: an index only helps to find outputs, it is never needed


def _recorded(root: Path, kind: str) -> list[tuple[Path, Path]]:
    """(output folder, the index naming it) for every `kind` output the runs under `root` recorded."""
    return [(Path(e["folder"]), index) for index in _find(root, OUTPUTS_INDEX) for e in _read_index(index) if e["kind"] == kind]


def _sample_manifest(folder: Path) -> Path | None:
    manifest = Path(folder) / "manifest.json"
    try:
        return manifest if is_sample_manifest(json.loads(manifest.read_text())) else None
    except (OSError, ValueError):
        return None


def newest_samples(root: Path = Path("runs")) -> tuple[Path, str]:
    """The newest `brics sample` output -- recorded by a run under `root`, or found below `root` --
    and where it was found (for the line that says what was picked)."""
    found = [(m.parent, f"found under {root}/") for m in _find(root, "manifest.json") if _sample_manifest(m.parent)]
    found += [(folder, f"recorded in {index}") for folder, index in _recorded(root, "samples") if _sample_manifest(folder)]
    if not found:
        raise ConfigError(f"no samples found (none recorded by the runs under {root}/, none below it): make them with "
                          f"`brics sample --from RUN --num-samples N --out DIR`, or pass --samples DIR")
    return _newest(found, "manifest.json")


def newest_reconstruction(root: Path = Path("runs")) -> tuple[Path, str]:
    """The newest `brics reconstruct` output (a folder with inputs/ and recon/) -- recorded by a run
    under `root`, found below it, or below ./recon -- and where it was found."""
    found = [(p.parent, f"found under {base}/") for base in (Path("recon"), Path(root)) for p in _find(base, "inputs")
             if (p.parent / "recon").is_dir()]
    found += [(folder, f"recorded in {index}") for folder, index in _recorded(root, "reconstructions")
              if (folder / "recon").is_dir()]
    if not found:
        raise ConfigError(f"no reconstructions found (none recorded by the runs under {root}/, none below it or ./recon): "
                          "make them with `brics reconstruct --from RUN --input SHARDS --out DIR`, or pass --samples DIR")
    return _newest(found, "recon")


def _newest(found: list[tuple[Path, str]], marker: str) -> tuple[Path, str]:
    """The (folder, where it was found) whose `marker` changed last; a folder both found and recorded counts
    once, as found (its path as the user would type it)."""
    unique: dict[Path, tuple[Path, str]] = {}
    for folder, why in found:
        unique.setdefault(folder.resolve(), (folder, why))
    return max(unique.values(), key=lambda item: (item[0] / marker).stat().st_mtime_ns)
