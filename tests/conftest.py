"""Shared fixtures: tiny real-photo shards made once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TINY_RECIPE = Path(__file__).parent / "recipes" / "tiny.yaml"


def brics(*args, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m brics_cli ARGS` in a fresh process; with `check`, a non-zero exit fails the test with its stderr."""
    out = subprocess.run([sys.executable, "-m", "brics_cli", *map(str, args)], capture_output=True, text=True)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def run_in_process_full(argv, capsys) -> tuple[int, str, str]:
    """`brics ARGV` through `main()` in this process: (exit code, stdout, stderr); ARGV items may be paths."""
    old = sys.argv
    sys.argv = ["brics", *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            from brics_cli.cli import main

            main()
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """`brics ARGV` through `main()` in this process: (exit code, stderr)."""
    code, _, err = run_in_process_full(argv, capsys)
    return code, err


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
