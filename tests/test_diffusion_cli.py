"""`brics diffusion-train` and `brics sample`: code cache, resume, per-index reproducible sampling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from brics_cli.core import checkpoint as ckpt
from conftest import TINY_RECIPE, brics


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_shards) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    brics("ae-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={root}", "ae.train.steps=4")
    brics("diffusion-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={root}")
    return root


def test_codes_are_encoded_once_and_reused(runs, tiny_shards, tmp_path):
    (key_dir,) = (runs / "codes").iterdir()
    record = json.loads((key_dir / "done.json").read_text())
    assert record["images"] == 64 and record["codes"] == 128  # data.flip: the mirror images too
    codes = ckpt.load_tensors(key_dir / record["parts"][0])["codes"]
    assert codes.dtype == torch.float16 and codes.shape == (128, 4, 8, 8) and 0 <= codes.min() and codes.max() <= 1
    again = brics("diffusion-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={runs}",
                  "--out", tmp_path / "other", "diffusion.train.steps=2", "--json")
    assert "encoding" not in again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["codes"]["key"] == key_dir.name


def test_ae_takes_the_run_root_the_stage_folder_or_the_checkpoint(runs, tiny_shards, tmp_path):
    newest = max((runs / "ae" / "checkpoints").glob("*.safetensors"))
    for source in (runs, runs / "ae", newest):
        plan = brics("diffusion-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={tmp_path}", "--ae", source,
                     "--dry-run", "--json")
        found = json.loads(plan.stdout.splitlines()[-1])
        assert found["ae_checkpoint"] == str(newest) and found["missing"] == [], source


def test_rerun_with_more_steps_continues_exactly(runs, tiny_shards, tmp_path):
    common = ["diffusion-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={runs}", "diffusion.train.checkpoint_every=100"]
    brics(*common, "diffusion.train.steps=6", "--out", tmp_path / "straight")
    brics(*common, "diffusion.train.steps=3", "--out", tmp_path / "split")
    resumed = brics(*common, "diffusion.train.steps=6", "--out", tmp_path / "split", "--json")
    assert json.loads(resumed.stdout.splitlines()[-1])["resumed_from"] == 3
    a = ckpt.load_tensors(ckpt.CheckpointDir(tmp_path / "straight" / "checkpoints").latest())
    b = ckpt.load_tensors(ckpt.CheckpointDir(tmp_path / "split" / "checkpoints").latest())
    assert set(a) == set(b)
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a if not k.startswith("rng")) <= 1e-6


def test_sample_is_reproducible_per_index_across_batch_sizes_and_interruptions(runs, tmp_path):
    run = runs / "diffusion"
    args = ["--from", run, "--num-samples", 12, "--sampler", "ddpm", "--steps", 60]
    brics("sample", *args, "--out", tmp_path / "b16", "--batch", 16)
    brics("sample", *args, "--out", tmp_path / "b4", "--batch", 4)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "brics_cli", "sample", *map(str, args), "--out", str(killed), "--batch", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("*.png"))) < 4:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(list(killed.glob("0*.png")))
    assert 4 <= partial < 12, "the kill must land in the middle of the run"
    rerun = brics("sample", *args, "--out", killed, "--batch", 4, "--json")
    assert "already there" in rerun.stderr
    names = sorted(p.name for p in (tmp_path / "b16").glob("0*.png"))
    assert len(names) == 12
    for folder in ("b4", "killed"):
        assert sorted(p.name for p in (tmp_path / folder).glob("0*.png")) == names
        for name in names:
            assert (tmp_path / folder / name).read_bytes() == (tmp_path / "b16" / name).read_bytes(), (folder, name)
    assert not list(killed.glob(".*tmp*"))
    manifest = json.loads((killed / "manifest.json").read_text())
    assert {"run", "checkpoint_sha256", "sampler", "steps", "seed", "count", "files"} <= set(manifest)
    assert manifest["count"] == 12 and manifest["files"][0] == "000000.png" and manifest["data"]
    assert (killed / "grid.png").is_file()
    other_seed = brics("sample", "--from", run, "--num-samples", 1, "--sampler", "ddpm", "--steps", 60, "--out", tmp_path / "s1", "--seed", 1)
    assert other_seed.returncode == 0
    assert (tmp_path / "s1" / "000000.png").read_bytes() != (tmp_path / "b16" / "000000.png").read_bytes()


def test_sample_without_a_run_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = subprocess.run([sys.executable, "-m", "brics_cli", "sample", "--num-samples", "4", "--out", "s"], capture_output=True, text=True)
    assert out.returncode == 2 and "no diffusion run found" in out.stderr and "Traceback" not in out.stderr


def test_sample_under_torchrun_splits_indices_and_matches_one_process(runs, tmp_path):
    args = ["sample", "--from", str(runs / "diffusion"), "--num-samples", "5", "--sampler", "ddim", "--steps", "10", "--batch", "2"]
    brics(*args, "--out", tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "brics_cli", *args, "--out", str(tmp_path / "two"), "--json"]  # no `--` needed: see README
    multi = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert len([line for line in multi.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 alone prints
    names = sorted(p.name for p in (tmp_path / "one").glob("0*.png"))
    assert len(names) == 5 and sorted(p.name for p in (tmp_path / "two").glob("0*.png")) == names
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_sample_stops_cleanly_on_a_signal_to_its_group_and_a_second_writer_is_refused(runs, tmp_path):
    # 400 steps a batch: the first run is still sampling while the second starts (a whole interpreter) and is refused
    args = ["sample", "--from", str(runs / "diffusion"), "--num-samples", "12", "--sampler", "ddpm", "--steps", "400", "--batch", "4"]
    brics(*args, "--out", tmp_path / "straight")
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "brics_cli", *args, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("0*.png")):
        time.sleep(0.02)
    second = brics(*args, "--out", out, check=False)  # while the first still writes
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler preempts a job: the whole process group
    _, err = proc.communicate(timeout=120)
    assert second.returncode == 1 and f"pid {proc.pid} on " in second.stderr and "another folder" in second.stderr
    assert proc.returncode == 0, err
    assert "SIGTERM: stopped after" in err and "rerun the same command" in err
    written = sorted(p.name for p in out.glob("0*.png"))
    assert 4 <= len(written) < 12 and len(written) % 4 == 0 and not (out / "manifest.json").exists()
    brics(*args, "--out", out)
    for name in sorted(p.name for p in (tmp_path / "straight").glob("0*.png")):
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
