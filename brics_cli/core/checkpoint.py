"""Checkpoints: one safetensors file per step, written atomically, the last K kept.

A checkpoint `checkpoints/step-000200.safetensors` holds every tensor (model, EMA, discriminator,
optimiser moments, RNG states) and, in the safetensors header's metadata, one JSON document
(`brics` key) with the resolved config, the registry names and plugin versions the model used,
the step, the optimisers' non-tensor state, Python RNG state and the data position. Loading
never unpickles anything: safetensors holds raw tensors and the rest is JSON.

Writes go to a temporary file in the same folder, are fsynced, renamed over the final name and
the folder is fsynced, so a checkpoint either exists completely or not at all -- a `kill -9` in
the middle leaves at most a `.tmp` file that the next save or load ignores and removes.

A file that cannot be used anyway -- truncated by a failing disk or a copy, not safetensors,
brics metadata that is not JSON or lacks a field -- raises `UnusableCheckpoint`, one line naming
the file and why, so that a resume can fall back to the previous checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from brics_cli.core.files import fsync_dir, remove_stale_temporaries, temporary_name
from brics_cli.errors import BricsError

STEP_FILE = re.compile(r"^step-(\d{6,})\.safetensors$")


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Save tensors + a JSON document (metadata key `brics`) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        save_file(contiguous, str(tmp), metadata={"brics": json.dumps(metadata)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except SafetensorError as exc:  # safetensors' own I/O error names no file: say which, as OSError does
        tmp.unlink(missing_ok=True)
        code = re.search(r"os error (\d+)", str(exc))
        raise OSError(int(code.group(1)) if code else errno.EIO, str(exc), str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class UnusableCheckpoint(BricsError):
    """A checkpoint file brics cannot resume from: unreadable, truncated, or with malformed metadata."""


def _expected_size(path: Path) -> int | None:
    """The least file size a safetensors header promises (8-byte length, JSON header, data); None if unknown."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little")
            if len(head) < 8 or length > 100_000_000:  # not a safetensors length: not a truncation
                return None
            text = f.read(length)
            if len(text) < length:  # cut inside the header
                return 8 + length
            header = json.loads(text)
        return 8 + length + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def _unreadable(path: Path, exc: Exception) -> UnusableCheckpoint:
    size = path.stat().st_size if path.is_file() else None
    expected = _expected_size(path) if size is not None else None
    if size == 0:
        why = "an empty file"
    elif size is not None and expected is not None and size < expected:
        why = f"truncated: {size} bytes, expected at least {expected}"
    else:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UnusableCheckpoint(f"{path}: not a readable brics checkpoint ({why})")


def read_metadata(path: Path, require: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON document of a checkpoint, without reading its tensors; `require`: keys it must have."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # not a safetensors file, truncated, missing, ...
        raise _unreadable(Path(path), exc) from exc
    if "brics" not in meta:
        raise UnusableCheckpoint(f"{path}: a safetensors file without brics metadata (not written by brics)")
    try:
        document = json.loads(meta["brics"])
    except ValueError as exc:
        raise UnusableCheckpoint(f"{path}: its brics metadata is not valid JSON ({exc}); the file is damaged") from exc
    if not isinstance(document, dict):
        raise UnusableCheckpoint(f"{path}: its brics metadata is not a JSON object; the file is damaged")
    missing = [key for key in require if key not in document]
    if missing:
        raise UnusableCheckpoint(f"{path}: its brics metadata lacks {', '.join(repr(k) for k in missing)}; "
                                 "the file is damaged or was not written by this brics")
    return document


def load_tensors(path: Path, prefix: str = "", device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors whose key starts with `prefix` (prefix stripped); only those are read from disk."""
    out = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key[len(prefix):]] = f.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise _unreadable(Path(path), exc) from exc
    return out


class CheckpointDir:
    """The `checkpoints/` folder of a run: save with pruning to the last `keep`, find the newest."""

    def __init__(self, folder: Path, keep: int = 3) -> None:
        self.folder = Path(folder)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:06d}.safetensors"

    def steps(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := STEP_FILE.match(p.name)))

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def newest_first(self) -> list[Path]:
        return [self.path(step) for step in reversed(self.steps())]

    def save(self, step: int, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
        remove_stale_temporaries(self.folder)  # left by a process killed mid-write
        path = self.path(step)
        save_tensors_atomic(path, tensors, metadata)
        for old in self.steps()[: -self.keep] if self.keep > 0 else []:
            self.path(old).unlink(missing_ok=True)
        return path


# -- optimiser state: tensors to safetensors, the rest to JSON ------------------------------------


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `opt.state_dict()` into flat tensors `prefix.<param>.<name>` and a JSON-able rest."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            idx, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = meta["param_groups"]
    for group in groups:  # JSON turns tuples into lists; Adam wants its betas as a tuple
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})

