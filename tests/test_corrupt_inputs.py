"""Corrupt images are data, not crashes (issue #15): real truncated, empty and garbage files, real FIFOs
and symlinks, through the real commands.

- `brics eval` (generative metrics and `recon`) and `brics nn-search` leave unreadable images out,
  name them, and give the same numbers as a run on the set without them; past MAX_UNREADABLE (1%)
  of a set they refuse with one line (exit 1) naming how many and the first file.
- `brics sample` rewrites a damaged image on a rerun, byte for byte what an undisturbed run wrote.
- `brics shard folder` counts FIFOs, broken symlinks and symlink loops, and never blocks on a FIFO.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brics_cli.eval.features import Extractor
from brics_cli.eval.generative import evaluate
from brics_cli.eval.image_sets import MAX_UNREADABLE, load_reference, load_samples
from brics_cli.eval.recon_metrics import evaluate_pairs
from brics_cli.errors import BricsError
from conftest import TINY_RECIPE
from eval_fixtures import make_samples, save_fake_fidelity_inception, write_pngs
from test_eval_metrics import RandomFeatureNet, photo_crops
from test_shard import run_cli


def brics(*args, env=None, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brics_cli", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The error of a refused run: exit 1, one `error:` line, the last one, no traceback (warnings may precede it)."""
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr and [line for line in lines if line.startswith("error:")] == lines[-1:], proc.stderr
    return lines[-1]


def noisy(images: np.ndarray, seed: int, sigma: float = 12.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)


def damage(path: Path, how: str) -> None:
    """Really damage an image file: cut it to 100 bytes (`truncate -s 100`), empty it, or overwrite it with text."""
    if how == "truncated":
        os.truncate(path, 100)
    elif how == "empty":
        os.truncate(path, 0)
    else:
        path.write_bytes(b"this is not a PNG, just some text\n" * 4)


def test_limit_is_one_percent():
    assert MAX_UNREADABLE == 0.01  # the error messages and the README say 1%


# -- generative metrics ---------------------------------------------------------------------------------------


def test_eval_fid_refuses_a_sample_set_with_a_truncated_image(tmp_path):
    """The production path (DataLoader workers decoding for torch-fidelity's Inception): the truncated file
    is caught in the worker, counted, and 1 of 10 is over the limit: one line, exit 1, before the reference is read."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRICS_") and k != "XDG_CACHE_HOME"}
    env.update(TORCH_HOME=str(tmp_path / "torch"), HOME=str(tmp_path / "home"), BRICS_CACHE_DIR=str(tmp_path / "cache"),
               BRICS_ALLOW_UNVERIFIED_WEIGHTS="1")  # not offline_env: its socket block also stops the DataLoader workers' fd passing
    save_fake_fidelity_inception(tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    samples = make_samples(tmp_path / "samples", photo_crops(10, seed=0, noise=0.05))
    write_pngs(tmp_path / "ref", photo_crops(10, seed=1))
    damage(samples / "000005.png", "truncated")
    proc = brics("eval", "fid", "--samples", samples, "--ref", tmp_path / "ref", "--workers", 2, "--batch", 4, "--device", "cpu",
                 env=env, cwd=tmp_path)
    line = one_error_line(proc)
    assert line.startswith("error: 1 of 10 generated images are unreadable, more than the 1% a metric may leave out (first: ")
    assert f"{samples / '000005.png'}: OSError: image file is truncated" in line
    assert line.endswith("rerun the same `brics sample` command: it rewrites unreadable images")
    assert not (samples / "eval-fid.json").exists()
    assert not list((tmp_path / "cache").rglob("*.npz"))  # nothing cached: the samples had a bad file, the reference was never read


def test_generative_metrics_leave_out_unreadable_images_up_to_the_limit(tmp_path, monkeypatch):
    """2 of 200 samples (truncated, empty) and 1 of 100 reference images (garbage) are exactly 1%: left out,
    named, and FID / KID / IS equal those of the sets without them; a repaired set is measured afresh
    (nothing stale cached); a third bad sample is refused."""
    monkeypatch.setenv("BRICS_CACHE_DIR", str(tmp_path / "cache"))
    net = RandomFeatureNet(0, "2048", "logits_unbiased")
    extractors = {"inception": Extractor("random-inception", ("2048", "logits_unbiased"), lambda paths, device: net)}
    gen, real = photo_crops(200, seed=3, noise=0.05), photo_crops(100, seed=4)
    samples_dir = make_samples(tmp_path / "samples", gen)
    write_pngs(tmp_path / "ref", real)
    keep_gen = [i for i in range(200) if i not in (10, 150)]
    keep_ref = [i for i in range(100) if i != 42]
    for i in keep_gen:  # the undisturbed sets: the same files without the bad ones
        write_pngs(tmp_path / "clean-samples", gen[i:i + 1], start=i)
    for i in keep_ref:
        write_pngs(tmp_path / "clean-ref", real[i:i + 1], start=i)
    damage(samples_dir / "000010.png", "truncated")
    damage(samples_dir / "000150.png", "empty")
    damage(tmp_path / "ref" / "000042.png", "garbage")
    metrics = ["fid", "kid", "is"]
    kwargs = dict(device=torch.device("cpu"), extractors=extractors, batch_size=16, workers=2)

    result = evaluate(metrics, load_samples(samples_dir), load_reference(str(tmp_path / "ref")), **kwargs)
    clean = evaluate(metrics, load_samples(tmp_path / "clean-samples"), load_reference(str(tmp_path / "clean-ref")), **kwargs)
    for key in ("fid", "kid_mean", "kid_std", "is_mean", "is_std"):
        assert result[key] == pytest.approx(clean[key], rel=1e-6), key
    proto = result["protocol"]
    assert proto["unreadable"] == {"generated": {"count": 2, "files": ["000010.png", "000150.png"]},
                                   "reference": {"count": 1, "files": ["000042.png"]}}
    assert (proto["n_generated"], proto["n_reference"]) == (198, 99)
    assert "2 unreadable generated images left out (first: 000010.png)" in proto["departures"]

    write_pngs(samples_dir, gen[10:11], start=10)  # repaired; the manifest (the set's fingerprint) is unchanged
    write_pngs(samples_dir, gen[150:151], start=150)
    repaired = evaluate(["is"], load_samples(samples_dir), None, **kwargs)
    assert repaired["protocol"]["unreadable"]["generated"] == {"count": 0, "files": []}
    assert repaired["protocol"]["n_generated"] == 200

    for i in (10, 150, 199):
        damage(samples_dir / f"{i:06d}.png", "garbage")
    net.calls = 0
    with pytest.raises(BricsError, match=r"^3 of 200 generated images are unreadable, more than the 1% .*first: .*000010\.png: "):
        evaluate(metrics, load_samples(samples_dir), load_reference(str(tmp_path / "ref")), **kwargs)
    assert net.calls == 13  # the 200 samples in batches of 16; refused before a reference image was read


# -- reconstruction metrics -----------------------------------------------------------------------------------


def test_eval_recon_drops_a_pair_with_an_unreadable_file(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "recon-val"
    inputs = photo_crops(120, seed=5)
    write_pngs(folder / "inputs", inputs)
    write_pngs(folder / "recon", noisy(inputs, seed=6))
    damage(folder / "recon" / "000007.png", "truncated")
    code, out, err = run_cli(monkeypatch, capsys, "eval", "recon", "--samples", folder, "--lpips-net", "none", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n"] == 119 and result["protocol"]["n"] == 119
    assert result["protocol"]["unreadable"] == {"count": 1, "files": ["000007.png"]}
    assert "warning: 1 unreadable image pairs left out (first: 000007.png)" in err
    assert json.loads((folder / "eval-recon.json").read_text())["protocol"]["unreadable"]["count"] == 1
    names = [f"{i:06d}.png" for i in range(120) if i != 7]
    clean = evaluate_pairs([(folder / "inputs" / n, folder / "recon" / n) for n in names], None, 64)
    assert result["psnr"] == pytest.approx(clean["psnr"], rel=1e-9) and result["ssim"] == pytest.approx(clean["ssim"], rel=1e-9)


def test_eval_recon_refuses_when_too_many_pairs_are_unreadable(tmp_path):
    folder = tmp_path / "recon-val"
    inputs = photo_crops(10, seed=7)
    write_pngs(folder / "inputs", inputs)
    write_pngs(folder / "recon", noisy(inputs, seed=8))
    damage(folder / "inputs" / "000003.png", "garbage")
    line = one_error_line(brics("eval", "recon", "--samples", folder, "--lpips-net", "none", "--device", "cpu"))
    assert line.startswith(f"error: 1 of 10 image pairs are unreadable, more than the 1% a metric may leave out "
                           f"(first: {folder / 'inputs' / '000003.png'}: UnidentifiedImageError: ")
    assert line.endswith(f"rerun `brics reconstruct` into {folder} or remove those pairs")
    assert not (folder / "eval-recon.json").exists()


# -- nearest-neighbour search ---------------------------------------------------------------------------------


def test_nn_search_leaves_out_an_unreadable_reference_image(tmp_path, monkeypatch, capsys):
    """Reference image 11 is the nearest neighbour of sample 0 until it is truncated: then both --exact and the
    two-stage search (fresh and from the embedding cache) give the answer for the folder without it."""
    monkeypatch.setenv("BRICS_CACHE_DIR", str(tmp_path / "cache"))
    real = photo_crops(120, seed=9)
    write_pngs(tmp_path / "ref", real)
    write_pngs(tmp_path / "clean-ref", real)
    (tmp_path / "clean-ref" / "000011.png").unlink()
    samples = make_samples(tmp_path / "samples", noisy(real[[11, 30, 31, 60, 90]], seed=10, sigma=4))
    damage(tmp_path / "ref" / "000011.png", "truncated")

    def nn(ref: str, out: str, *flags) -> dict:
        code, _, err = run_cli(monkeypatch, capsys, "nn-search", "--samples", samples, "--ref", tmp_path / ref, "--metric", "l2",
                               "--k", 3, "--out", tmp_path / out, *flags)
        assert code == 0, err
        return json.loads((tmp_path / out / "nn.json").read_text()), err

    for flags in (["--exact"], ["--candidates", "24"], ["--candidates", "24"]):  # the last one reads the cached embeddings
        report, err = nn("ref", "nn", *flags)
        clean, _ = nn("clean-ref", "nn-clean", *flags)
        # The same neighbours; distances to the last bits only, as the reference batches of the matmuls shift by one image.
        for ours, theirs in zip(report["queries"], clean["queries"], strict=True):
            assert [n["key"] for n in ours["neighbours"]] == [n["key"] for n in theirs["neighbours"]], flags
            assert [n["distance"] for n in ours["neighbours"]] == pytest.approx([n["distance"] for n in theirs["neighbours"]], rel=1e-9)
            assert (ours["sample"], ours["certified"]) == (theirs["sample"], theirs["certified"])
        assert report["search"]["unreadable"] == {"samples": {"count": 0, "files": []}, "reference": {"count": 1, "files": ["000011.png"]}}
        assert report["search"]["reference"]["n"] == 119
        assert "warning: 1 unreadable reference images left out (first: 000011.png)" in err
    caches = (tmp_path / "cache" / "nn").glob("embed-l2-*.npy")  # one per reference folder
    assert sorted(np.isnan(np.load(p)).any(1).nonzero()[0].tolist() for p in caches) == [[], [11]]  # image 11: no embedding


def test_nn_search_refuses_unreadable_samples(tmp_path):
    env = {**os.environ, "BRICS_CACHE_DIR": str(tmp_path / "cache")}
    write_pngs(tmp_path / "ref", photo_crops(20, seed=11))
    samples = make_samples(tmp_path / "samples", photo_crops(5, seed=12))
    damage(samples / "000002.png", "empty")
    proc = brics("nn-search", "--samples", samples, "--ref", tmp_path / "ref", "--metric", "l2", "--out", tmp_path / "nn",
                 "--device", "cpu", env=env)
    line = one_error_line(proc)
    assert line.startswith(f"error: 1 of 5 samples are unreadable, more than the 1% a metric may leave out "
                           f"(first: {samples / '000002.png'}: UnidentifiedImageError: ")
    assert not (tmp_path / "nn" / "nn.json").exists()
    assert not (tmp_path / "cache" / "nn").exists()  # refused before the reference was embedded


# -- brics sample ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory, tiny_shards) -> Path:
    root = tmp_path_factory.mktemp("corrupt-pipeline")
    for command, steps in (("ae-train", "ae.train.steps=2"), ("diffusion-train", "diffusion.train.steps=2")):
        proc = brics(command, TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={root}", steps, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "diffusion"


def test_sample_rerun_rewrites_damaged_images_byte_for_byte(diffusion_run, tmp_path):
    """Cut to 100 bytes, cut by one byte (PIL still decodes it), a readable PNG of the wrong size, and a
    missing file: the rerun rewrites exactly those four and the folder equals an undisturbed run's."""
    args = ["sample", "--from", diffusion_run, "--num-samples", 8, "--steps", 4, "--batch", 8, "--device", "cpu"]
    first = brics(*args, "--out", tmp_path / "undisturbed")
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(tmp_path / "undisturbed", tmp_path / "damaged")
    out = tmp_path / "damaged"
    os.truncate(out / "000005.png", 100)
    os.truncate(out / "000002.png", (out / "000002.png").stat().st_size - 1)
    Image.open(out / "000002.png").load()  # the fault is real: PIL alone would call this file fine
    Image.new("RGB", (16, 16), "red").save(out / "000003.png")
    (out / "000006.png").unlink()
    untouched = {p.name: p.stat().st_mtime_ns for p in out.glob("0*.png") if p.name not in ("000002.png", "000003.png", "000005.png")}
    rerun = brics(*args, "--out", out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{out}: 4 images already there; writing the missing 4" in rerun.stderr
    names = sorted(p.name for p in (tmp_path / "undisturbed").iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if name != "manifest.json":  # it names its own folder
            assert (out / name).read_bytes() == (tmp_path / "undisturbed" / name).read_bytes(), name
    assert {n: (out / n).stat().st_mtime_ns for n in untouched} == untouched  # the good ones were not rewritten


# -- brics shard folder ---------------------------------------------------------------------------------------


def shard_images_by_source(out: Path) -> dict[str, bytes]:
    """source_id -> the stored image bytes, over every shard."""
    found = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in members.items():
            if name.endswith(".json"):
                found[json.loads(data)["source_id"]] = members[name[: -len("json")] + "png"]
    return found


def test_shard_folder_counts_fifos_broken_links_and_loops(tmp_path):
    """A FIFO no one writes to (a read would block forever), a dangling symlink, three looping symlinks and a
    symlink to a good image: counted under not_regular / broken_link / link_loop, the link followed, and the
    images stored are those of a folder of plain files."""
    src, plain = tmp_path / "src", tmp_path / "plain"
    write_pngs(src / "photos", photo_crops(4, seed=13, size=40))
    shutil.copytree(src, plain)
    shutil.copy(src / "photos" / "000001.png", plain / "linked.png")
    os.mkfifo(src / "pipe.png")
    (src / "dangling.png").symlink_to(src / "gone.png")
    (src / "self.png").symlink_to(src / "self.png")
    (src / "a.png").symlink_to(src / "b.png")
    (src / "b.png").symlink_to(src / "a.png")
    (src / "linked.png").symlink_to(src / "photos" / "000001.png")
    common = ["--resolution", 32, "--val-count", 0, "--shard-size", 2, "--workers", 2]
    proc = brics("shard", "folder", src, "--out", tmp_path / "out", *common, timeout=120)  # a blocked read would time out here
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["failures"] == {"broken_link": 1, "link_loop": 3, "not_regular": 1}
    assert manifest["failure_examples"]["not_regular"] == ["pipe.png: a FIFO, not a regular file"]
    assert manifest["failure_examples"]["broken_link"] == [f"dangling.png: symlink to {src / 'gone.png'}, which does not exist"]
    assert sorted(e.split(":")[0] for e in manifest["failure_examples"]["link_loop"]) == ["a.png", "b.png", "self.png"]
    assert manifest["counts"] == {"train": 5, "val": 0}
    assert "skipped 5" in proc.stderr + proc.stdout
    reference = brics("shard", "folder", plain, "--out", tmp_path / "plain-out", *common)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert shard_images_by_source(tmp_path / "out") == shard_images_by_source(tmp_path / "plain-out")
