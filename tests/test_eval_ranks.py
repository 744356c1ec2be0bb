"""`brics eval` and `brics nn-search` under torchrun: two gloo ranks share the images and give one process's numbers.

Every command runs twice as a real CLI process, once alone and once as `torchrun --nproc_per_node 2`, both
with OMP_NUM_THREADS=1: each rank works through whole batches of the single-process run, so the features,
distances and per-pair metrics are equal bit for bit (a different thread count alone rounds float32
convolutions differently, ~1e-7 relative, whatever the split). The pretrained networks are the real
architectures with fixed random weights under the published file names (eval_fixtures.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brics_cli.eval.image_sets import export_shards
from eval_fixtures import make_samples, save_fake_fidelity_inception, save_fake_torchvision, write_pngs
from test_eval_cli import demo_shards, noisy_copies

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "brics_cli", "--"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Fake Inception and AlexNet weights, 6 training images in shards, 10 samples of them; for nn-search
    a folder of 100 reference images (one truncated, in rank 1's half) and 12 samples."""
    root = tmp_path_factory.mktemp("ranks")
    hub = root / "torch" / "hub" / "checkpoints"
    save_fake_fidelity_inception(hub / "weights-inception-2015-12-05-6726825d.pth")
    save_fake_torchvision("alexnet", hub / "alexnet-owt-7be5be79.pth")
    shards = demo_shards(root / "shards", train=6)
    with pytest.MonkeyPatch.context() as mp:  # the training images as files, to make samples of
        mp.setenv("BRICS_CACHE_DIR", str(root / "fixture-cache"))
        exported = export_shards(shards, "train").path
    samples = make_samples(root / "samples", noisy_copies(exported, 10, seed=0), data=str(shards))
    rng = np.random.default_rng(1)
    reference = write_pngs(root / "reference", rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8))
    truncate(reference[70])
    nn_samples = make_samples(root / "nn-samples", noisy_copies(root / "reference", 12, seed=2))
    return {"root": root, "shards": shards, "exported": exported, "samples": samples, "reference": root / "reference",
            "nn_samples": nn_samples}


def truncate(path: Path) -> None:
    """A file cut short, as a killed writer or a full disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def brics(world, cache: Path, *args, ranks: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRICS_") and k != "XDG_CACHE_HOME"}
    env.update(TORCH_HOME=str(world["root"] / "torch"), HOME=str(world["root"] / "home"), BRICS_CACHE_DIR=str(cache),
               BRICS_ALLOW_UNVERIFIED_WEIGHTS="1", BRICS_PROGRESS="off", OMP_NUM_THREADS="1")
    launcher = TORCHRUN if ranks == 2 else [sys.executable, "-m", "brics_cli"]
    return subprocess.run([*launcher, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


def one_json_line(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone prints
    return json.loads(lines[0])


def features_in(cache: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for path in sorted((cache / "features").iterdir()):
        with np.load(path) as data:
            out[path.name] = {name: data[name] for name in data}
    return out


def test_eval_fid_under_torchrun_equals_one_process(world, tmp_path):
    """--batch 3: 10 samples are 4 batches (rank 0: 6 images, rank 1: 4), 6 reference images 2 batches."""
    args = ("eval", "fid", "--samples", world["samples"], "--batch", "3", "--json")
    one = one_json_line(brics(world, tmp_path / "one", *args))
    assert json.loads((world["samples"] / "eval-fid.json").read_text()) == one
    two = one_json_line(brics(world, tmp_path / "two", *args, ranks=2))
    assert json.loads((world["samples"] / "eval-fid.json").read_text()) == two
    # The reference was exported into each run's own cache (rank 0 exports, rank 1 reads it); all else is equal.
    assert two["protocol"]["reference"].pop("path").startswith(str(tmp_path / "two"))
    one["protocol"]["reference"].pop("path")
    assert two == one and two["fid"] > 0
    # The gathered features rank 0 cached are the single-process features, bit for bit (so KID and IS too).
    ours, theirs = features_in(tmp_path / "two"), features_in(tmp_path / "one")
    assert sorted(ours) == sorted(theirs) and len(ours) == 2  # samples and reference, no temporaries left
    for name in ours:
        assert all(np.array_equal(ours[name][f], theirs[name][f]) for f in ("2048", "logits_unbiased")), name
    assert {len(f["2048"]) for f in ours.values()} == {10, 6}


def test_eval_under_torchrun_refuses_a_set_whose_gathered_unreadable_share_is_too_large(world, tmp_path):
    """One truncated sample of ten, in rank 1's share: counted against all ten after the gather; one message."""
    samples = make_samples(tmp_path / "samples", noisy_copies(world["exported"], 10, seed=0), data=str(world["shards"]))
    truncate(samples / "000008.png")
    proc = brics(world, tmp_path / "cache", "eval", "is", "--samples", samples, "--batch", "3", "--json", ranks=2)
    assert proc.returncode == 1 and "{" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: 1 of 10 generated images are unreadable, more than the 1% a metric may leave out (first: "
                      f"{samples / '000008.png'}: OSError: image file is truncated); rerun the same `brics sample` command: "
                      "it rewrites unreadable images"]
    assert not (samples / "eval-is.json").exists() and not list((tmp_path / "cache" / "features").glob("*"))


def test_eval_recon_under_torchrun_equals_one_process(world, tmp_path):
    """7 pairs in batches of 2: rank 0 measures 4 pairs, rank 1 3; PSNR, SSIM and LPIPS (fake AlexNet) as one process."""
    folder = tmp_path / "recon-val"
    write_pngs(folder / "inputs", noisy_copies(world["exported"], 7, seed=3))
    write_pngs(folder / "recon", noisy_copies(folder / "inputs", 7, seed=4))
    args = ("eval", "recon", "--samples", folder, "--batch", "2", "--json")
    one = one_json_line(brics(world, tmp_path / "cache", *args))
    two = one_json_line(brics(world, tmp_path / "cache", *args, ranks=2))
    assert two == one and json.loads((folder / "eval-recon.json").read_text()) == two
    assert two["n"] == 7 and two["lpips"]["mean"] > 0 and two["protocol"]["unreadable"]["count"] == 0


def test_nn_search_exact_l2_under_torchrun_equals_one_process(world, tmp_path):
    """100 reference images in blocks of 8: rank 0 scans 48, rank 1 52 (with the truncated one); the merged
    neighbours, the unreadable record and the contact sheet are one process's."""
    args = ("nn-search", "--samples", world["nn_samples"], "--ref", world["reference"], "--metric", "l2", "--exact",
            "--k", "4", "--batch", "8", "--json")
    one = one_json_line(brics(world, tmp_path / "cache", *args, "--out", tmp_path / "one"))
    two = one_json_line(brics(world, tmp_path / "cache", *args, "--out", tmp_path / "two", ranks=2))
    nn = json.loads((tmp_path / "two" / "nn.json").read_text())
    assert nn == json.loads((tmp_path / "one" / "nn.json").read_text())
    assert (tmp_path / "two" / "nn-grid.png").read_bytes() == (tmp_path / "one" / "nn-grid.png").read_bytes()
    assert {k: v for k, v in two.items() if k != "out"} == {k: v for k, v in one.items() if k != "out"}
    assert two["exact_distances"] == 12 * 100 and len(nn["queries"]) == 12
    assert nn["search"]["unreadable"]["reference"] == {"count": 1, "files": ["000070.png"]} and nn["search"]["reference"]["n"] == 99
    assert all(n["key"] != "000070" for q in nn["queries"] for n in q["neighbours"])
    # The samples are noisy copies of reference images 0..11: each finds its own first.
    assert [q["neighbours"][0]["key"] for q in nn["queries"]] == [f"{i:06d}" for i in range(12)]


def test_nn_search_lpips_two_stage_under_torchrun_equals_one_process(world, tmp_path):
    """LPIPS (fake AlexNet): rank 0 and rank 1 embed half the reference each, rank 0 alone caches it; the 12
    queries are re-ranked in two groups of 8 and 4 (512 // 64 candidates), one per rank."""
    args = ("nn-search", "--samples", world["nn_samples"], "--ref", world["reference"], "--k", "3", "--candidates", "64",
            "--batch", "16", "--json")
    one = one_json_line(brics(world, tmp_path / "one-cache", *args, "--out", tmp_path / "one"))
    two = one_json_line(brics(world, tmp_path / "two-cache", *args, "--out", tmp_path / "two", ranks=2))
    nn = json.loads((tmp_path / "two" / "nn.json").read_text())
    assert nn == json.loads((tmp_path / "one" / "nn.json").read_text())
    assert two["mode"] == "two-stage" and two["exact_distances"] == 12 * 64 and two["certified"] == one["certified"]
    assert nn["search"]["unreadable"]["reference"]["files"] == ["000070.png"]
    [ours] = list((tmp_path / "two-cache" / "nn").iterdir())
    [theirs] = list((tmp_path / "one-cache" / "nn").iterdir())
    assert ours.name == theirs.name and np.array_equal(np.load(ours), np.load(theirs), equal_nan=True)
    assert np.isnan(np.load(ours)[70]).all() and not np.isnan(np.load(ours)[:70]).any()
