"""Metrics while the diffusion model trains (paper Fig. 11; brics_cli/train/eval_curve.py), end to end.

Each logged number is recomputed here by another path: the EMA of the checkpoint at that step,
sampled again with the documented noise, the reference codes drawn by the documented rule, and a
numpy/scipy Frechet distance (scipy's `sqrtm`) on features cut out with plain loops. FID runs
torch-fidelity's Inception with fixed random weights saved under its published file name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from brics_cli.core import checkpoint as ckpt
from brics_cli.diffusion.loss import x0_to_codes
from brics_cli.diffusion.model import DiffusionModel
from brics_cli.diffusion.samplers import sample_generators
from brics_cli.registry import SAMPLERS
from brics_cli.train.diffusion import read_code_cache
from brics_cli.train.eval_curve import code_features, code_patch
from conftest import TINY_RECIPE
from eval_fixtures import save_fake_fidelity_inception

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
EVAL = ["diffusion.train.eval_every=2", "diffusion.train.eval_samples=20", "diffusion.train.eval_steps=2",
        "diffusion.train.checkpoint_every=2", "diffusion.train.keep=10"]


def isolated_env(root: Path, **extra) -> dict[str, str]:
    """No weight file anywhere brics looks, caches under `root`, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRICS_")}
    env.pop("XDG_CACHE_HOME", None)
    env.update(TORCH_HOME=str(root / "torch"), BRICS_CACHE_DIR=str(root / "cache"), OMP_NUM_THREADS="1", BRICS_TENSORBOARD="0")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def brics(*args, env: dict[str, str], launcher: tuple[str, ...] = ("-m", "brics_cli")) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *launcher, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def eval_records(run: Path) -> list[dict]:
    return [r for r in records(run) if "eval" in r]


def resampled_codes(run: Path, step: int, n: int, batch: int = 64, steps: int = 2) -> np.ndarray:
    """The codes the evaluation at `step` should have sampled: the checkpoint's EMA, noise i = sample_generator(0, i), ddim eta 0."""
    model = DiffusionModel.from_checkpoint(run / "checkpoints" / f"step-{step:06d}.safetensors")
    parts = []
    for start in range(0, n, batch):
        indices = range(start, min(start + batch, n))
        x0 = SAMPLERS.get("ddim")(model.unet, model.schedule, model.code_shape, steps=steps,
                                  generators=sample_generators(0, indices), eta=0.0, clip_x0=True)
        parts.append(x0_to_codes(x0).to(torch.float16))
    return torch.cat(parts).double().numpy()


def reference_codes(run: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The documented rule: randperm(N, seed eval_seed) of the run's code cache; the first n codes, and the next n (the data floor)."""
    meta = ckpt.read_metadata(ckpt.CheckpointDir(run / "checkpoints").latest())
    codes, _ = read_code_cache(Path(meta["codes"]["dir"]))
    order = torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))
    return codes[order[:n]].double().numpy(), codes[order[n:2 * n]].double().numpy()


def patch_rows(codes: np.ndarray, p: int) -> np.ndarray:
    """Every non-overlapping p x p patch of every code as one row of C*p*p numbers, with plain loops."""
    N, C, H, W = codes.shape
    return np.stack([codes[n, :, i:i + p, j:j + p].reshape(-1) for n in range(N) for i in range(0, H, p) for j in range(0, W, p)])


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)), as clean-fid and pytorch-fid compute it."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sa @ sb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def ae_root(tmp_path_factory, tiny_shards) -> Path:
    root = tmp_path_factory.mktemp("curve")
    brics("ae-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={root}", "ae.train.steps=4", env=isolated_env(root))
    return root


@pytest.fixture(scope="module")
def curve_run(ae_root, tiny_shards):
    """4 steps, evaluated at 2 and 4, no Inception file, TensorBoard on."""
    run = ae_root / "nofid"
    env = isolated_env(ae_root, BRICS_TENSORBOARD="1")
    out = brics("diffusion-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={ae_root}", *EVAL,
                "diffusion.train.steps=4", "--out", run, "--json", env=env)
    return run, out


def test_code_features_are_flat_or_patches_and_match_plain_loops():
    assert code_patch((4, 8, 8), 300) is None  # 256 numbers < 300 codes: the whole code
    assert code_patch((4, 8, 8), 20) == 2 and code_patch((4, 8, 8), 65) == 4 and code_patch((4, 8, 8), 16) == 1
    assert code_patch((4, 64, 64), 1000) == 8 and code_patch((4, 64, 64), 5000) == 32  # the paper's 64x64x4 codes
    codes = torch.rand(3, 4, 8, 8, dtype=torch.float64)
    assert np.array_equal(code_features(codes, None).numpy(), codes.reshape(3, -1).numpy())
    for p in (1, 2, 4):
        got = code_features(codes, p).numpy()
        want = patch_rows(codes.numpy(), p)
        assert got.shape == want.shape == (3 * (8 // p) ** 2, 4 * p * p)
        assert np.array_equal(got[np.lexsort(got.T)], want[np.lexsort(want.T)])  # the same rows


def test_eval_records_hold_the_code_frechet_distance_of_the_ema_samples(curve_run, ae_root):
    run, out = curve_run
    evals = eval_records(run)
    assert [r["step"] for r in evals] == [2, 4]
    assert sorted({r["step"] for r in records(run) if "loss" in r}) == [2, 4]  # the loss records are still there
    reference, floor_set = reference_codes(run, 20)
    for record in evals:
        e = record["eval"]
        assert e["samples"] == 20 and e["reference_codes"] == 20 and e["sampler"] == "ddim" and e["sampler_steps"] == 2
        assert e["code_features"].startswith("2x2 code patches (16-d") and e["seconds"] > 0 and "fid" not in e
        generated = resampled_codes(run, record["step"], 20)
        want = scipy_frechet(patch_rows(generated, 2), patch_rows(reference, 2))
        assert e["code_fd"] == pytest.approx(want, rel=1e-6, abs=1e-9)
        floor = scipy_frechet(patch_rows(floor_set, 2), patch_rows(reference, 2))
        assert e["code_fd_data"] == pytest.approx(floor, rel=1e-6, abs=1e-9)
    assert evals[0]["eval"]["code_fd"] != evals[1]["eval"]["code_fd"]  # the model moved, the noise did not


def test_without_inception_weights_one_note_and_no_fid_and_exit_0(curve_run, ae_root):
    run, out = curve_run
    notes = [line for line in out.stderr.splitlines() if "FID skipped" in line]
    assert len(notes) == 1 and str(ae_root / "torch" / "hub" / "checkpoints" / INCEPTION_FILE) in notes[0], out.stderr
    costs = [line for line in out.stderr.splitlines() if line.startswith("eval at step")]
    assert len(costs) == 2 and all(" s, evaluations took " in line and "% of this run's" in line for line in costs)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["step"] == 4 and "FID skipped" in result["eval_curve"]["fid"]


def test_eval_curve_png_and_tensorboard_scalars(curve_run):
    run, _ = curve_run
    with Image.open(run / "eval-curve.png") as img:
        img.load()
        assert img.size[0] > 100 and img.size[1] > 100
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert {t for t in events.Tags()["scalars"] if t.startswith("eval/")} == {"eval/code_fd", "eval/code_fd_data", "eval/seconds"}
    assert [e.step for e in events.Scalars("eval/code_fd")] == [2, 4]
    assert [e.value for e in events.Scalars("eval/code_fd")] == pytest.approx([r["eval"]["code_fd"] for r in eval_records(run)])


def test_a_run_killed_after_an_evaluation_and_rerun_logs_each_eval_step_once(curve_run, ae_root, tiny_shards, tmp_path):
    run, _ = curve_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # As if killed after logging step 4's evaluation but before checkpointing step 4: the rerun resumes at 2.
    (copy / "checkpoints" / "step-000004.safetensors").unlink()
    common = ["diffusion-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={ae_root}", *EVAL, "--out", copy]
    rerun = brics(*common, "diffusion.train.steps=6", env=isolated_env(ae_root))
    assert "from step 2" in rerun.stderr
    assert [r["step"] for r in eval_records(copy)] == [2, 4, 6]
    again = brics(*common, "diffusion.train.steps=8", env=isolated_env(ae_root))  # resumed at 6: the curve goes on
    assert "from step 6" in again.stderr
    assert [r["step"] for r in eval_records(copy)] == [2, 4, 6, 8]
    assert eval_records(copy)[0] == eval_records(run)[0]  # the kept point is the first run's record
    steps = [r["step"] for r in records(copy) if "loss" in r]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """8 training images: a reference set Inception on a CPU measures in a few seconds."""
    out = tmp_path_factory.mktemp("small") / "shards"
    subprocess.run([sys.executable, "-m", "brics_cli", "shard", "demo", "--out", str(out), "--resolution", "32",
                    "--train-count", "8", "--val-count", "2", "--shard-size", "8"], check=True, capture_output=True)
    return out


def shard_images(shards: Path) -> np.ndarray:
    """The training images of a shard folder as uint8 (N, 3, H, W), read from the tars with tarfile and PIL."""
    images = []
    for tar_path in sorted(shards.glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.isfile() and member.name.rsplit(".", 1)[-1].lower() in ("png", "jpg", "jpeg", "webp"):
                    with Image.open(BytesIO(tar.extractfile(member).read())) as img:
                        images.append(np.asarray(img.convert("RGB")).transpose(2, 0, 1))
    return np.stack(images)


def test_fid_with_random_weight_inception_equals_a_second_computation(ae_root, small_shards, tmp_path):
    weights_file = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE
    save_fake_fidelity_inception(weights_file)
    env = isolated_env(tmp_path, BRICS_ALLOW_UNVERIFIED_WEIGHTS=1)
    run = tmp_path / "fid"
    out = brics("diffusion-train", TINY_RECIPE, f"data.shards={small_shards}", f"run.dir={ae_root}", *EVAL,
                "diffusion.train.eval_samples=4", "diffusion.train.steps=2", "--out", run, env=env)
    assert "FID skipped" not in out.stderr and "FID against the Inception statistics of 8 training images" in out.stderr
    [record] = eval_records(run)
    e = record["eval"]
    assert record["step"] == 2 and e["fid_reference_images"] == 8 and e["fid"] > 0
    assert list((tmp_path / "cache" / "features").glob("features-*.npz"))  # `brics eval`'s cache: extracted once

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from brics_cli.core.images import to_uint8
    from brics_cli.models.autoencoder import BRICSAutoencoder

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_file))
    ae = BRICSAutoencoder.from_checkpoint(ckpt.CheckpointDir(ae_root / "ae" / "checkpoints").latest())
    codes = torch.from_numpy(resampled_codes(run, 2, 4)).float()
    with torch.no_grad():
        generated = net(to_uint8(ae.decode(codes)))[0].double().numpy()  # (4, 2048)
        real = net(torch.from_numpy(shard_images(small_shards)))[0].double().numpy()  # (8, 2048)
    # 4 samples in 2048 dimensions: tr sqrt(S_g S_r) from the 4 x 4 matrix A S_r A^T / (n - 1), A the centred samples.
    a = generated - generated.mean(0)
    s_real = np.cov(real, rowvar=False)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(a @ s_real @ a.T / 3), 0, None)).sum()
    want = ((generated.mean(0) - real.mean(0)) ** 2).sum() + np.trace(a.T @ a / 3) + np.trace(s_real) - 2 * tr_covmean
    assert e["fid"] == pytest.approx(want, rel=1e-4)


def test_two_ranks_stay_in_step_and_log_the_one_process_metric(ae_root, tiny_shards, tmp_path):
    run = tmp_path / "two"
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "brics_cli", "--")
    out = brics("diffusion-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={ae_root}", *EVAL,
                "diffusion.train.eval_batch=8", "diffusion.train.steps=2", "--out", run, env=isolated_env(tmp_path),
                launcher=torchrun)
    assert out.stderr.count("FID skipped") == 1  # rank 0 alone says it
    [record] = eval_records(run)  # rank 0 alone writes
    # Rank 0 sampled codes 0-7, rank 1 codes 8-19 in batches of 8 and 4: the batches one process forms.
    generated = resampled_codes(run, 2, 20, batch=8)
    reference, _ = reference_codes(run, 20)
    want = scipy_frechet(patch_rows(generated, 2), patch_rows(reference, 2))
    assert record["eval"]["code_fd"] == pytest.approx(want, rel=1e-6, abs=1e-9)
