"""`brics reconstruct`: deterministic reconstructions, Table 2 metrics, grid usage, plugin provenance."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_RECIPE
from test_shard import run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_shards):
    run = tmp_path_factory.mktemp("ae") / "ae"
    out = subprocess.run([sys.executable, "-m", "brics_cli", "ae-train", str(TINY_RECIPE), f"data.shards={tiny_shards}",
                          "ae.train.steps=6", "--run-dir", str(run), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return run


def load(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 127.5 - 1


def test_metrics_match_the_written_images_and_reruns_are_identical(tmp_path, trained, tiny_shards, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "reconstruct", "--run", trained, "--input", tiny_shards,
                             "--out", tmp_path / "a", "--n", 10, "--batch", 4, "--usage", "--json")
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["n"] == 10 and json.loads((tmp_path / "a" / "metrics.json").read_text()) == result
    assert result["lpips"] is None and "alexnet" in result["lpips_unavailable"]
    # PSNR from the PNGs on disk (8-bit rounding moves it by far less than 0.2 dB).
    values = []
    for i in range(10):
        x, y = load(tmp_path / "a" / "inputs" / f"{i:06d}.png"), load(tmp_path / "a" / "recon" / f"{i:06d}.png")
        values.append(10 * np.log10(4.0 / np.mean((x - y) ** 2)))
    assert abs(np.mean(values) - result["psnr"]["mean"]) < 0.2
    assert abs(np.std(values) - result["psnr"]["std"]) < 0.2
    assert 0 < result["ssim"]["mean"] <= 1
    assert len(result["usage"]) == 4 and all(0 < u <= 1 for u in result["usage"])
    assert (tmp_path / "a" / "usage.png").is_file() and (tmp_path / "a" / "grid.png").is_file()
    # Deterministic: a second run with another batch size writes identical files.
    code, out, err = run_cli(monkeypatch, capsys, "reconstruct", "--run", trained, "--input", tiny_shards,
                             "--out", tmp_path / "b", "--n", 10, "--batch", 3, "--json")
    assert code == 0, err
    for i in range(10):
        a = (tmp_path / "a" / "recon" / f"{i:06d}.png").read_bytes()
        assert a == (tmp_path / "b" / "recon" / f"{i:06d}.png").read_bytes()
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["split"] == "val" and len(manifest["keys"]) == 10 and len(manifest["checkpoint_sha256"]) == 64


def test_a_folder_of_images_with_a_corrupt_file(tmp_path, trained, monkeypatch, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (50, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    code, out, err = run_cli(monkeypatch, capsys, "reconstruct", "--ckpt", next((trained / "checkpoints").glob("*.safetensors")),
                             "--input", folder, "--out", tmp_path / "o", "--json")
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["n"] == 3 and sum(result["skipped"].values()) == 1
    assert Image.open(tmp_path / "o" / "recon" / "000000.png").size == (32, 32)


def test_checkpoint_names_the_missing_decoder_plugin(tmp_path, tiny_shards):
    run = tmp_path / "vq"
    cmd = [sys.executable, "-m", "brics_cli", "ae-train", str(TINY_RECIPE), f"data.shards={tiny_shards}",
           "ae.decoder.name=vqgan", "ae.decoder.ch=32", "ae.decoder.ch_mult=[1,1,1]", "ae.decoder.num_res_blocks=0",
           "ae.decoder.attn_resolutions=[]", "ae.train.steps=2", "--run-dir", str(run), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    from brics_cli.train.checkpoint import read_metadata

    meta = read_metadata(next((run / "checkpoints").glob("*.safetensors")))
    assert meta["decoder"]["name"] == "vqgan" and meta["decoder"]["distribution"] == "brics-vqgan"
    assert meta["decoder"]["version"]
    env = {**os.environ, "BRICS_LOAD_PLUGINS": ""}
    rec = subprocess.run([sys.executable, "-m", "brics_cli", "reconstruct", "--run", str(run), "--input", str(tiny_shards),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert rec.returncode == 1
    assert "brics-vqgan" in rec.stderr and "pip install" in rec.stderr and "Traceback" not in rec.stderr
