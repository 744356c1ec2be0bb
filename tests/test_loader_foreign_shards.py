"""Shards written by other tools -- `webdataset.ShardWriter`, img2dataset, public WebDataset releases:
`.jpg` / `.jpeg` / `.png` / `.webp` images of any size beside `.cls` / `.txt` / `.json` entries (issue 19)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from brics_cli.core import checkpoint as ckpt
from brics_cli.data.config import DataConfig
from brics_cli.data.loader import ShardDataset
from brics_cli.errors import BricsError
from conftest import TINY_RECIPE

SIZES = [(48, 32), (32, 48), (20, 20), (33, 57), (64, 64), (32, 32), (100, 40), (40, 100)]  # (w, h)


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth gradient with noise: content a crop or resize visibly changes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 0 * x], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


def write_shards(folder: Path, samples: list[dict], per_shard: int) -> str:
    """Shards as `webdataset.ShardWriter` writes them; returns their brace pattern."""
    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    count = len(list(folder.glob("shard-*.tar")))
    return str(folder / f"shard-{{000000..{count - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def jpg_shards(tmp_path_factory) -> str:
    """16 .jpg photos of assorted sizes with .cls / .txt labels, in 2 shards (an img2dataset-like layout)."""
    samples = [
        {"__key__": f"{i:09d}", "jpg": encoded(photo(*SIZES[i % len(SIZES)], i), "jpg"), "cls": i % 3, "txt": f"caption {i}"}
        for i in range(16)
    ]
    return write_shards(tmp_path_factory.mktemp("foreign") / "jpg", samples, per_shard=8)


def train_cmd(shards: str, run: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "brics_cli", "ae-train", str(TINY_RECIPE), f"data.shards={shards}", "ae.train.steps=2",
            "ae.train.checkpoint_every=2", *overrides, "--out", str(run), "--json"]


def test_shardwriter_jpgs_of_any_size_train_with_ae_train(tmp_path, jpg_shards):
    proc = subprocess.run(train_cmd(jpg_shards, tmp_path / "run"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["step"] == 2 and result["skipped_samples"] == 0  # every sample used: none refused for its size
    assert ckpt.CheckpointDir(tmp_path / "run" / "checkpoints").steps() == [2]


def test_resize_error_refuses_a_wrong_size_sample_in_one_line_naming_the_key(tmp_path, jpg_shards):
    # val_images=0 and a worker: the refusal comes from a DataLoader worker process, not the main one.
    proc = subprocess.run(train_cmd(jpg_shards, tmp_path / "run", "data.resize=error", "data.workers=1", "ae.train.val_images=0"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: data.resize=error: sample '")
    assert any(f" is {w}x{h}, not 32x32 (data.resolution)" in lines[0] for w, h in SIZES), lines[0]
    assert "data.resize=center-crop" in lines[0]  # the fix
    assert not ckpt.CheckpointDir(tmp_path / "run" / "checkpoints").steps()


def test_resize_error_in_the_main_process_raises_the_same_line(jpg_shards):
    dataset = ShardDataset(DataConfig(shards=jpg_shards, resolution=32, shuffle=0, resize="error"), "train")
    with pytest.raises(BricsError, match=r"^data\.resize=error: sample '000000000' in .*shard-000000\.tar is 48x32, not 32x32"):
        list(dataset)


def pil_reference(data: bytes, resolution: int, left: int | None = None) -> torch.Tensor:
    """The documented rule written out with PIL: the short side's square (centred: left = (w - s) // 2),
    Lanczos-resized in one exact pass, as LDM / clean-fid crop."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = min(w, h)
    left = (w - s) // 2 if left is None else left
    top = (h - s) // 2
    out = img.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.LANCZOS, reducing_gap=None)
    return torch.from_numpy(np.asarray(out).astype(np.float32)).permute(2, 0, 1) / 127.5 - 1


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> tuple[str, dict[str, bytes]]:
    """One image per accepted key (.png, .jpg, .jpeg, .webp), each beside keys the loader must ignore."""
    images = {}
    samples = []
    for i, (fmt, size) in enumerate([("png", (40, 24)), ("jpg", (24, 40)), ("jpeg", (16, 16)), ("webp", (50, 30)), ("png", (10, 12))]):
        images[f"s{i}"] = encoded(photo(*size, 100 + i), fmt)
        samples.append({"__key__": f"s{i}", fmt: images[f"s{i}"], "cls": i, "txt": "a photo", "json": {"size": list(size)}})
    return write_shards(tmp_path_factory.mktemp("foreign") / "mixed", samples, per_shard=5), images


def test_center_crop_equals_the_pil_reference_for_every_image_key(mixed_shards):
    pattern, images = mixed_shards
    dataset = ShardDataset(DataConfig(shards=pattern, resolution=16, shuffle=0, flip=False), "train")
    seen = {key: image for image, key in dataset}
    assert sorted(seen) == sorted(images) and dataset.skipped.count == 0
    for key, image in seen.items():
        assert image.shape == (3, 16, 16)
        torch.testing.assert_close(image, pil_reference(images[key], 16), atol=0, rtol=0)


def test_random_crop_takes_a_square_of_the_short_side_at_a_new_place_each_epoch(mixed_shards):
    pattern, images = mixed_shards
    candidates = [pil_reference(images["s0"], 16, left) for left in range(17)]  # 40x24: the 24-square starts at 0..16
    cfg = DataConfig(shards=pattern, resolution=16, shuffle=0, flip=False, resize="random-crop")

    def crop_left(epoch: int) -> int:
        dataset = ShardDataset(cfg, "train", seed=1)
        dataset.epoch = epoch
        image = next(image for image, key in dataset if key == "s0")
        matches = [left for left, ref in enumerate(candidates) if torch.equal(image, ref)]
        assert matches, f"epoch {epoch}: not a square crop of the short side"
        return matches[0]

    lefts = [crop_left(epoch) for epoch in range(6)]
    assert len(set(lefts)) >= 3, lefts
    assert crop_left(2) == lefts[2]  # a resumed run crops as the uninterrupted one did


def test_unknown_resize_policy_is_a_config_error_listing_the_choices(tmp_path, jpg_shards):
    proc = subprocess.run(train_cmd(jpg_shards, tmp_path / "run", "data.resize=crop", "--dry-run"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "data.resize" in proc.stderr and "center-crop" in proc.stderr and "random-crop" in proc.stderr
