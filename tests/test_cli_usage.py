"""Usage errors exit 2 with one line, before any work: `--device cuda` without CUDA, conflicting flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_in_process as run

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "recipes" / "demo.yaml")

COMMANDS = {
    "ae-train": ["ae-train", DEMO, "--dry-run"],
    "diffusion-train": ["diffusion-train", DEMO, "--dry-run"],
    "reconstruct": ["reconstruct", "--input", "nowhere", "--out", "out"],
    "sample": ["sample", "--num-samples", "4", "--out", "out"],
    "eval": ["eval", "fid"],
    "eval recon": ["eval", "recon"],
    "nn-search": ["nn-search", "--metric", "l2"],
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_device_cuda_without_cuda_is_a_usage_error(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/ here: the device must be checked before the lookup fails
    code, err = run(COMMANDS[name] + ["--device", "cuda"], capsys)
    assert code == 2, err
    assert err.strip().splitlines() == ["error: --device cuda: no CUDA device is visible to torch here; use --device cpu"]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_misspelt_device_is_a_usage_error(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run(COMMANDS[name] + ["--device", "gpu"], capsys)
    assert code == 2 and "--device must be auto, cpu, cuda or cuda:N, got 'gpu'" in err


@pytest.mark.parametrize("argv, message", [
    (["reconstruct", "--input", "x", "--out", "o", "--run", "r", "--ckpt", "c"], "give --run or --ckpt, not both"),
    (["shard", "ffhq", "nowhere", "--out", "o", "--val-count", "3"], "--val-count needs --split random"),
    (["shard", "lsun", "nowhere", "--out", "o", "--val-lmdb", "v", "--val-count", "3"], "--val-count and --val-lmdb exclude each other"),
])
def test_conflicting_flags_are_usage_errors(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run(argv, capsys)
    assert code == 2 and message in err, err
