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
                          "ae.train.steps=6", "--out", str(run), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return run


def load(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 127.5 - 1


def test_metrics_match_the_written_images_and_reruns_are_identical(tmp_path, trained, tiny_shards, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "reconstruct", "--from", trained, "--input", tiny_shards,
                             "--out", tmp_path / "a", "--limit", 10, "--batch", 4, "--usage", "--json")
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
    code, out, err = run_cli(monkeypatch, capsys, "reconstruct", "--from", trained, "--input", tiny_shards,
                             "--out", tmp_path / "b", "--limit", 10, "--batch", 3, "--json")
    assert code == 0, err
    for i in range(10):
        a = (tmp_path / "a" / "recon" / f"{i:06d}.png").read_bytes()
        assert a == (tmp_path / "b" / "recon" / f"{i:06d}.png").read_bytes()
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["split"] == "val" and len(manifest["keys"]) == 10 and len(manifest["checkpoint_sha256"]) == 64


def test_from_takes_the_run_root_the_stage_folder_or_the_checkpoint(tmp_path, trained, tiny_shards, monkeypatch, capsys):
    """`--from runs/demo` (the recipe's run.dir), `runs/demo/ae` and a checkpoint file read the same model."""
    newest = max((trained / "checkpoints").glob("*.safetensors"))
    for name, source in (("root", trained.parent), ("stage", trained), ("file", newest)):
        code, _, err = run_cli(monkeypatch, capsys, "reconstruct", "--from", source, "--input", tiny_shards,
                               "--out", tmp_path / name, "--limit", 2, "--json")
        assert code == 0, err
        assert json.loads((tmp_path / name / "manifest.json").read_text())["checkpoint"] == str(newest)
    for i in range(2):
        assert len({(tmp_path / name / "recon" / f"{i:06d}.png").read_bytes() for name in ("root", "stage", "file")}) == 1
    recorded = [e["folder"] for e in json.loads((trained / "outputs.json").read_text())["outputs"]]
    assert recorded[-3:] == [str((tmp_path / name).resolve()) for name in ("root", "stage", "file")]


def test_a_folder_of_images_with_a_corrupt_file(tmp_path, trained, monkeypatch, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (50, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    code, out, err = run_cli(monkeypatch, capsys, "reconstruct", "--from", next((trained / "checkpoints").glob("*.safetensors")),
                             "--input", folder, "--out", tmp_path / "o", "--json")
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["n"] == 3 and sum(result["skipped"].values()) == 1
    assert Image.open(tmp_path / "o" / "recon" / "000000.png").size == (32, 32)


def test_checkpoint_names_the_missing_decoder_plugin(tmp_path, tiny_shards):
    run = tmp_path / "vq"
    cmd = [sys.executable, "-m", "brics_cli", "ae-train", str(TINY_RECIPE), f"data.shards={tiny_shards}",
           "ae.decoder.name=vqgan", "ae.decoder.ch=32", "ae.decoder.ch_mult=[1,1,1]", "ae.decoder.num_res_blocks=0",
           "ae.decoder.attn_resolutions=[]", "ae.train.steps=2", "--out", str(run), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    from brics_cli.core.checkpoint import read_metadata

    meta = read_metadata(next((run / "checkpoints").glob("*.safetensors")))
    assert meta["decoder"]["name"] == "vqgan" and meta["decoder"]["distribution"] == "brics-vqgan"
    assert meta["decoder"]["version"]
    env = {**os.environ, "BRICS_LOAD_PLUGINS": ""}
    rec = subprocess.run([sys.executable, "-m", "brics_cli", "reconstruct", "--from", str(run), "--input", str(tiny_shards),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert rec.returncode == 1
    assert "brics-vqgan" in rec.stderr and "pip install" in rec.stderr and "Traceback" not in rec.stderr


def test_torchrun_two_cpu_ranks_split_the_images_and_agree_with_one_process(tmp_path, trained, tiny_shards):
    args = ["reconstruct", "--from", str(trained), "--input", str(tiny_shards), "--limit", "7", "--batch", "2", "--usage", "--json"]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # as each rank below: thread counts change the last bits
    single = subprocess.run([sys.executable, "-m", "brics_cli", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=300, env=one_thread)
    assert single.returncode == 0, single.stderr
    # As the README types it, without `--`: no brics flag is an abbreviation of a torchrun one (test_flags.py).
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "brics_cli", *args, "--out", str(tmp_path / "two")]
    multi = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, env=one_thread)
    assert multi.returncode == 0, multi.stderr[-3000:]
    lines = [line for line in multi.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    one, two = json.loads(single.stdout.splitlines()[-1]), json.loads(lines[0])
    assert two["n"] == one["n"] == 7
    for metric in ("psnr", "ssim"):
        for stat in ("mean", "std"):
            assert two[metric][stat] == pytest.approx(one[metric][stat], abs=1e-5)
    assert two["usage"] == pytest.approx(one["usage"])  # hit counts summed over both ranks
    assert json.loads((tmp_path / "two" / "metrics.json").read_text()) == two
    for i in range(7):  # every image written once, by its rank, as the single process writes it
        for folder in ("inputs", "recon"):
            assert (tmp_path / "two" / folder / f"{i:06d}.png").read_bytes() == (tmp_path / "one" / folder / f"{i:06d}.png").read_bytes()
    assert not (tmp_path / "two" / "recon" / "000007.png").exists()
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two")]
    assert manifests[0]["keys"] == manifests[1]["keys"] and manifests[1]["count"] == 7
    assert manifests[0]["per_rank"] == [7] and manifests[1]["per_rank"] == [4, 3]  # images 0,2,4,6 and 1,3,5
    assert (tmp_path / "two" / "grid.png").read_bytes() == (tmp_path / "one" / "grid.png").read_bytes()
    assert (tmp_path / "two" / "usage.png").is_file()
