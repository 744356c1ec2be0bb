"""`brics eval fd-dinov2`: DINOv2 ViT-L/14 features as EDM2 computes them, from the standard local weight file.

The weight file is a real ViT-L/14 state dict with fixed random values, written here under the published
name `dinov2_vitl14_pretrain.pth` with the key names of DINOv2's `DinoVisionTransformer` (listed below from
its definition, not from brics' module). The second path is independent: a naive forward written out from
DINOv2's definition and EDM2's `DINOv2Detector` preprocessing, then the Frechet distance in numpy. Where a
checkout of the facebookresearch/dinov2 hub repo is on the machine (`BRICS_DINOV2_HUB=DIR`), one more test
runs torch-fidelity 0.4's own DINOv2 extractor on the same weights.

ViT-L/14 at 224 is ~160 GFLOPs an image, so few images: 3 generated and 3 reference, each through both
paths (~50 s on 2 cores); the other tests reuse the cached features.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval_fixtures import make_samples, offline_env, write_pngs
from test_shard import run_cli

DIM, DEPTH, HEADS, PATCH, GRID = 1024, 24, 16, 14, 37  # dinov2_vitl14


def vitl14_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of `dinov2_vitl14_pretrain.pth`, as DINOv2's DinoVisionTransformer names it (block_chunks=0)."""
    shapes = {"cls_token": (1, 1, DIM), "pos_embed": (1, GRID * GRID + 1, DIM), "mask_token": (1, DIM),
              "patch_embed.proj.weight": (DIM, 3, PATCH, PATCH), "patch_embed.proj.bias": (DIM,)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (DIM,), b + "norm1.bias": (DIM,),
            b + "attn.qkv.weight": (3 * DIM, DIM), b + "attn.qkv.bias": (3 * DIM,),
            b + "attn.proj.weight": (DIM, DIM), b + "attn.proj.bias": (DIM,),
            b + "ls1.gamma": (DIM,),
            b + "norm2.weight": (DIM,), b + "norm2.bias": (DIM,),
            b + "mlp.fc1.weight": (4 * DIM, DIM), b + "mlp.fc1.bias": (4 * DIM,),
            b + "mlp.fc2.weight": (DIM, 4 * DIM), b + "mlp.fc2.bias": (DIM,),
            b + "ls2.gamma": (DIM,),
        })
    shapes.update({"norm.weight": (DIM,), "norm.bias": (DIM,)})
    return shapes


def random_vitl14_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed random values; the linear layers are Hankel matrices W[i, j] = r[i + j] (a strided view of
    rows + cols numbers), so the file is ~10 MB instead of 1.2 GB while each layer stays a full-rank random map."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in vitl14_shapes().items():
        if name.endswith("gamma"):  # LayerScale: large enough that every block changes the class token
            t = 0.5 + 0.5 * torch.rand(shape, generator=g)
        elif "norm" in name and name.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 2 and shape[0] > 1:
            rows, cols = shape
            t = (torch.randn(rows + cols, generator=g) / cols**0.5).as_strided(shape, (1, 1))
        elif name == "patch_embed.proj.weight":
            t = torch.randn(shape, generator=g) / math.prod(shape[1:]) ** 0.5
        else:  # biases, class / mask tokens, position embedding
            t = torch.randn(shape, generator=g) * (0.5 if name in ("cls_token", "pos_embed") else 0.02)
        state[name] = t
    return state


def naive_dinov2_features(state: dict[str, torch.Tensor], images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 1024): EDM2's DINOv2Detector (resize_mode "torch") and DINOv2's forward, written out."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    if x.shape[2:] != (224, 224):
        x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True)
    x = (x / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    w = lambda name: state[name].contiguous().float()  # noqa: E731
    n, side = x.shape[0], 224 // PATCH
    patches = x.reshape(n, 3, side, PATCH, side, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(n, side * side, 3 * PATCH * PATCH)
    tokens = F.linear(patches, w("patch_embed.proj.weight").reshape(DIM, -1), w("patch_embed.proj.bias"))  # conv 14/14 as a matmul
    pos = w("pos_embed")
    grid = pos[:, 1:].reshape(1, GRID, GRID, DIM).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((side + 0.1) / GRID,) * 2, mode="bicubic", antialias=False)  # DINOv2's offset 0.1
    pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, side * side, DIM)], 1)
    h = torch.cat([w("cls_token").expand(n, 1, DIM), tokens], 1) + pos

    def layer_norm(t, prefix):
        mean, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-6) * w(prefix + ".weight") + w(prefix + ".bias")

    for i in range(DEPTH):
        b = f"blocks.{i}."
        qkv = F.linear(layer_norm(h, b + "norm1"), w(b + "attn.qkv.weight"), w(b + "attn.qkv.bias"))  # x W^T + b
        q, k, v = qkv.reshape(n, -1, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS), -1) @ v  # (N, heads, T, 64)
        attention = F.linear(attention.transpose(1, 2).reshape(n, -1, DIM), w(b + "attn.proj.weight"), w(b + "attn.proj.bias"))
        h = h + attention * w(b + "ls1.gamma")
        hidden = F.linear(layer_norm(h, b + "norm2"), w(b + "mlp.fc1.weight"), w(b + "mlp.fc1.bias"))
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
        h = h + F.linear(hidden, w(b + "mlp.fc2.weight"), w(b + "mlp.fc2.bias")) * w(b + "ls2.gamma")
    return layer_norm(h, "norm")[:, 0].numpy()


def numpy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) in numpy float64 (np.cov: ddof 1)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    lam, vec = np.linalg.eigh(s_a)
    root_a = (vec * np.sqrt(np.clip(lam, 0, None))) @ vec.T
    inner = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def pictures(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Smooth colour fields plus noise: images that differ in more than their noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(-3, 3, 3), rng.uniform(-3, 3, 3), rng.uniform(0, 1, 3)
        img = 255 * (0.5 + 0.4 * np.sin(a * xx[..., None] * 3 + b * yy[..., None] * 3 + c * 6))
        out.append(np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def dino_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dinov2")
    hub = root / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    state = random_vitl14_state()
    torch.save(state, hub / "dinov2_vitl14_pretrain.pth")
    generated, real = pictures(3, seed=1), pictures(3, seed=2)
    samples = make_samples(root / "samples", generated)
    write_pngs(root / "reference", real)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(TORCH_HOME=root / "torch", HOME=root / "home", BRICS_CACHE_DIR=root / "cache").items():
            mp.setenv(key, str(value))
        for key in ("XDG_CACHE_HOME", "BRICS_WEIGHTS_DIR", "BRICS_ALLOW_UNVERIFIED_WEIGHTS"):
            mp.delenv(key, raising=False)
        yield {"root": root, "hub": hub, "state": state, "samples": samples, "reference": root / "reference",
               "generated": generated, "real": real}


def cli_json(monkeypatch, capsys, *args):
    code, out, err = run_cli(monkeypatch, capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def test_fd_dinov2_equals_a_naive_vitl14_forward_and_numpy_frechet(monkeypatch, capsys, dino_world):
    start = time.perf_counter()
    result, err = cli_json(monkeypatch, capsys, "eval", "fd-dinov2", "--samples", dino_world["samples"],
                           "--ref", dino_world["reference"], "--batch", "3")
    ours_seconds = time.perf_counter() - start
    theirs_generated = naive_dinov2_features(dino_world["state"], dino_world["generated"])
    theirs_real = naive_dinov2_features(dino_world["state"], dino_world["real"])
    expected = numpy_frechet(theirs_generated, theirs_real)
    assert expected > 1.0 and np.std(theirs_generated, 0).mean() > 0.01  # features that depend on the image
    assert result["fd_dinov2"] == pytest.approx(expected, rel=1e-4)

    from brics_cli.eval.features import production_extractors
    from brics_cli.eval.generative import set_features
    from brics_cli.eval.image_sets import load_reference

    dinov2 = production_extractors()["dinov2"]  # the features the command cached are the naive forward's, row by row
    reference = load_reference(str(dino_world["reference"]))
    ours = set_features(reference, dinov2, torch.device("cpu"), 3, 0, None, "", {}, None)["dinov2"]  # a cache hit
    assert ours.shape == (3, 1024) and np.allclose(ours, theirs_real, rtol=1e-3, atol=1e-4)

    proto = result["protocol"]
    assert proto["feature_extractors"]["fd-dinov2"].endswith("/ dinov2")
    assert "bicubic" in proto["resize"][dinov2.name] and "224" in proto["resize"][dinov2.name]
    assert proto["fd_dinov2"]["feature"] == "class token after the final LayerNorm"
    w = proto["weights"][0]
    assert w["file"] == "dinov2_vitl14_pretrain.pth" and len(w["sha256"]) == 64 and w["verified"] is None
    assert not any("not the published" in d for d in proto["departures"])  # no published checksum: nothing to differ from
    print(f"brics fd-dinov2 on 3 + 3 images: {ours_seconds:.1f} s")


def test_fd_dinov2_from_reference_statistics_equals_from_images(monkeypatch, capsys, dino_world):
    """Runs after the test above: both feature sets are cached, so no ViT forward is needed here."""
    images, _ = cli_json(monkeypatch, capsys, "eval", "fd-dinov2", "--samples", dino_world["samples"], "--ref", dino_world["reference"])
    stats_file = dino_world["root"] / "ref-stats.npz"
    made, err = cli_json(monkeypatch, capsys, "eval", "stats", "--ref", dino_world["reference"], "--out", stats_file)
    assert "dinov2/dinov2/mu" in made["arrays"] and set(made["provenance"]["networks"]) == {"dinov2"}
    assert set(made["provenance"]["skipped"]) == {"inception", "clip", "vgg16"}  # their weights are absent: noted
    assert "skipped" in err
    stats, _ = cli_json(monkeypatch, capsys, "eval", "fd-dinov2", "--samples", dino_world["samples"], "--ref-stats", stats_file)
    assert stats["fd_dinov2"] == pytest.approx(images["fd_dinov2"], rel=1e-9)
    assert stats["protocol"]["reference"]["kind"] == "stats" and stats["protocol"]["reference"]["path"] == str(stats_file)
    assert stats["protocol"]["n_reference"] == 3


def test_weights_status_lists_dinov2_and_missing_weights_stop_before_any_work(monkeypatch, capsys, dino_world, tmp_path):
    report, _ = cli_json(monkeypatch, capsys, "weights", "status")
    row = {r["name"]: r for r in report["weights"]}["dinov2-vit-l-14"]
    assert row["file"] == "dinov2_vitl14_pretrain.pth" and row["expected_dir"] == str(dino_world["hub"])
    assert row["present"] and row["sha256"] is None and row["sha256_ok"] is None
    assert row["actual_sha256"] == __import__("hashlib").sha256((dino_world["hub"] / row["file"]).read_bytes()).hexdigest()
    assert row["url"].endswith("/dinov2_vitl14/dinov2_vitl14_pretrain.pth")
    monkeypatch.setenv("COLUMNS", "300")  # one line per file
    code, out, _ = run_cli(monkeypatch, capsys, "weights", "status")
    assert code == 0 and "no published sha256" in out and row["actual_sha256"][:16] in out

    env = offline_env(tmp_path)  # no weights, no network
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "brics_cli", "eval", "fd-dinov2", "--samples", str(dino_world["samples"]),
                           "--ref", str(dino_world["reference"])], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and time.perf_counter() - started < 30, proc.stderr  # WeightsMissing: a missing prerequisite
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: missing pretrained weight file 'dinov2_vitl14_pretrain.pth'")
    assert f"{tmp_path / 'torch' / 'hub' / 'checkpoints'}/" in proc.stderr
    assert not (tmp_path / "cache").exists()  # nothing extracted, nothing cached
    proc = subprocess.run([sys.executable, "-m", "brics_cli", "eval", "stats", "--ref", str(dino_world["reference"]),
                           "--out", str(tmp_path / "s.npz"), "--networks", "dinov2"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "dinov2_vitl14_pretrain.pth" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "s.npz").exists()


def test_a_file_that_is_not_vitl14_is_named(monkeypatch, dino_world, tmp_path):
    from brics_cli.errors import BricsError
    from brics_cli.eval.dinov2 import load_dinov2_vitl14

    state = {k: v for k, v in dino_world["state"].items() if not k.startswith("blocks.23.")}  # a ViT of 23 blocks
    torch.save(state, tmp_path / "dinov2_vitl14_pretrain.pth")
    with pytest.raises(BricsError, match="not a DINOv2 ViT-L/14 state dict.*14 keys missing.*blocks.23"):
        load_dinov2_vitl14(tmp_path / "dinov2_vitl14_pretrain.pth", torch.device("cpu"))


HUB_REPO = os.environ.get("BRICS_DINOV2_HUB")


@pytest.mark.skipif(not HUB_REPO, reason="set BRICS_DINOV2_HUB to a checkout of facebookresearch/dinov2 to compare with torch-fidelity")
def test_matches_torch_fidelity_dinov2_extractor_on_the_hub_code(monkeypatch, dino_world, tmp_path):
    """torch-fidelity 0.4's `dinov2-vit-l-14` (torch.hub, offline from a local hub cache) on the same weights.
    Its preprocessing resizes bilinearly (TF 1.x), EDM2's bicubically: at 224 x 224 neither resizes."""
    import socket

    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

    from brics_cli.eval.features import production_extractors

    hub = tmp_path / "torch" / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    os.symlink(Path(HUB_REPO).resolve(), hub / "facebookresearch_dinov2_main")
    os.symlink(dino_world["hub"] / "dinov2_vitl14_pretrain.pth", hub / "checkpoints" / "dinov2_vitl14_pretrain.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XFORMERS_DISABLED", "1")

    def offline(*args, **kwargs):
        raise OSError("network access blocked by the test")

    monkeypatch.setattr(socket, "getaddrinfo", offline)  # torch.hub then falls back to its cache
    theirs_net = FeatureExtractorDinoV2("dinov2-vit-l-14", ["dinov2"])
    images = torch.from_numpy(pictures(2, seed=3, size=224)).permute(0, 3, 1, 2).contiguous()
    cpu = torch.device("cpu")
    ours_net = production_extractors()["dinov2"].load(cpu)
    with torch.no_grad():
        theirs = theirs_net(images)[0]
        ours = ours_net(images)["dinov2"]
    assert ours.shape == theirs.shape == (2, 1024)
    print(f"max |brics - torch-fidelity| = {(ours - theirs).abs().max():.2e} (features of std {theirs.std():.2f})")
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4), (ours - theirs).abs().max()
