"""Disk full (a real file-size limit, RLIMIT_FSIZE) is one line naming the file, exit 1, nothing
half-written; a rerun with room finishes the job with the undisturbed result."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import torch

from brics_cli.core.checkpoint import load_tensors
from conftest import TINY_RECIPE


def run(args: list[str], file_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:  # Python ignores SIGXFSZ, so an oversized write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, "-m", "brics_cli", *args], capture_output=True, text=True,
                          preexec_fn=limit if file_limit else None)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_ae_train_on_a_full_disk_then_rerun_equals_a_straight_run(tmp_path, tiny_shards):
    args = ["ae-train", str(TINY_RECIPE), f"data.shards={tiny_shards}", "ae.train.deterministic=true", "--json"]
    straight = run(args + ["--out", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr
    full = run(args + ["--out", str(tmp_path / "run")], file_limit=1_000_000)  # a checkpoint is ~2.5 MB
    assert full.returncode == 1 and "Traceback" not in full.stderr
    [line] = error_lines(full)
    assert f"cannot write {tmp_path / 'run' / 'checkpoints' / 'step-000004.safetensors'}: " in line
    assert "File too large" in line and "rerun the same command" in line
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []  # no partial checkpoint, no temporary
    rerun = run(args + ["--out", str(tmp_path / "run")])
    assert rerun.returncode == 0, rerun.stderr
    a = load_tensors(tmp_path / "straight" / "checkpoints" / "step-000008.safetensors", "ema.")
    b = load_tensors(tmp_path / "run" / "checkpoints" / "step-000008.safetensors", "ema.")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shard_on_a_full_disk_then_rerun_equals_a_fresh_run(tmp_path):
    args = ["shard", "demo", "--resolution", "32", "--train-count", "64", "--val-count", "8", "--shard-size", "16"]
    fresh = run(args + ["--out", str(tmp_path / "fresh")])
    assert fresh.returncode == 0, fresh.stderr
    full = run(args + ["--out", str(tmp_path / "out")], file_limit=20_000)  # a 16-image shard is ~40 kB
    assert full.returncode == 1 and "Traceback" not in full.stderr
    [line] = error_lines(full)
    assert f"cannot write {tmp_path / 'out'}/train-000000.tar: File too large" in line
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tar") or ".tmp" in p.name]
    rerun = run(args + ["--out", str(tmp_path / "out")])
    assert rerun.returncode == 0, rerun.stderr
    for tar in sorted((tmp_path / "fresh").glob("*.tar")):
        assert (tmp_path / "out" / tar.name).read_bytes() == tar.read_bytes()
