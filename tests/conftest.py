"""Shared fixtures: tiny real-photo shards made once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TINY_RECIPE = Path(__file__).parent / "recipes" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """32x32 crops of the demo photos: 64 training and 16 held-out images in 32-image shards."""
    out = tmp_path_factory.mktemp("shards") / "tiny"
    subprocess.run(
        [sys.executable, "-m", "brics_cli", "shard", "demo", "--out", str(out), "--resolution", "32",
         "--train-count", "64", "--val-count", "16", "--shard-size", "32"],
        check=True, capture_output=True,
    )
    return out


@pytest.fixture
def one_thread():
    """Tiny tensors: threads only add overhead (and thrash when other jobs share the 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
