"""Shared test helpers for the eval tests: an isolated weights environment and weight files made of
real networks with fixed random weights, saved under the published file names (so the production
loading code runs unchanged; their checksums differ, so tests set BRICS_ALLOW_UNVERIFIED_WEIGHTS=1).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image


def isolate_weights(monkeypatch, tmp_path: Path) -> Path:
    """Point every weight location at empty folders under tmp_path; returns the torch hub checkpoints dir."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.cache/clip
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("BRICS_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("BRICS_ALLOW_UNVERIFIED_WEIGHTS", raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


@contextlib.contextmanager
def private_weights_environment(root: Path) -> Iterator[None]:
    """TORCH_HOME, HOME (CLIP) and BRICS_CACHE_DIR under `root`, unverified (random-weight) files allowed,
    for a module-scoped fixture (monkeypatch is function-scoped)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(TORCH_HOME=root / "torch", HOME=root / "home", BRICS_CACHE_DIR=root / "cache",
                               BRICS_ALLOW_UNVERIFIED_WEIGHTS=1).items():
            mp.setenv(key, str(value))
        mp.delenv("XDG_CACHE_HOME", raising=False)
        mp.delenv("BRICS_WEIGHTS_DIR", raising=False)
        yield


def compact_random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's state dict with fixed random values; big matrices are Hankel matrices of a random
    vector (W[i, j] = r[i + j], stored as a strided view of len(r) = rows + cols numbers), so a
    "VGG16" file is ~60 MB instead of 528 MB while every layer stays a full-rank random map."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if t.dim() == 2 and t.numel() > 1_000_000:
            rows, cols = t.shape
            r = torch.randn(rows + cols, generator=g) / cols**0.5
            out[name] = r.as_strided((rows, cols), (1, 1))
        elif t.dim() > 1:  # He-scaled, so activations neither vanish nor explode through 16 layers
            out[name] = torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5
        else:
            out[name] = torch.randn(t.shape, generator=g) * 0.01
    return out


def save_fake_torchvision(arch: str, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random `torchvision.models.<arch>` state dict saved at `path`; returns it."""
    import torchvision

    with torch.device("meta"):  # shapes only: skips the slow random init of 138M parameters
        model = getattr(torchvision.models, arch)(weights=None)
    state = compact_random_state_dict(model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def write_pngs(folder: Path, images: np.ndarray, start: int = 0) -> list[Path]:
    """uint8 (N, H, W, 3) -> folder/000000.png ..."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = folder / f"{start + i:06d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def make_samples(folder: Path, images: np.ndarray, run: str = "runs/x/diffusion", data: str | None = None) -> Path:
    """A `brics sample`-style folder: PNGs + manifest.json of the documented shape."""
    paths = write_pngs(folder, images)
    manifest = {
        "run": run, "checkpoint_sha256": "0" * 64, "sampler": "ddim", "steps": 50, "seed": 0,
        "count": len(paths), "files": [p.name for p in paths],
    }
    if data is not None:
        manifest["data"] = data
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def save_fake_fidelity_inception(path: Path, seed: int = 0) -> None:
    """torch-fidelity's InceptionV3 with fixed random He-scaled weights, saved as its weight file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name("empty-state.pth")
    torch.save({}, empty)
    model = RandomInit("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():  # He scaling keeps activations alive through 90 layers
        if name.endswith("weight") and t.dim() > 1:
            t = torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5
        state[name] = t
    torch.save(state, path)
    empty.unlink()


BLOCK_NETWORK = '''
import socket

def _blocked(*args, **kwargs):
    raise OSError("network access blocked by the test")

socket.socket.connect = _blocked
socket.socket.connect_ex = _blocked
socket.create_connection = _blocked
'''


def offline_env(tmp_path: Path, **extra) -> dict:
    """Environment for a CLI subprocess with no network (a sitecustomize makes every connect raise) and no weights."""
    import os

    site = tmp_path / "offline-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK_NETWORK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRICS_")}
    env.update(PYTHONPATH=str(site), TORCH_HOME=str(tmp_path / "torch"), HOME=str(tmp_path / "home"),
               BRICS_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("XDG_CACHE_HOME", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env
