"""The WebDataset training loader on shards written by `brics shard` (issue 3)."""

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brics_cli.cli import main
from brics_cli.data.config import DataConfig
from brics_cli.data.loader import ShardDataset, make_loader
from brics_cli.errors import BricsError


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "demo"
    argv = sys.argv
    sys.argv = ["brics", "shard", "demo", "--out", str(out), "--train-count", "40", "--val-count", "8",
                "--resolution", "16", "--shard-size", "5"]
    try:
        main()
    except SystemExit as exc:
        assert not exc.code
    finally:
        sys.argv = argv
    return out


def reference_images(out: Path, split: str) -> dict[str, np.ndarray]:
    images = {}
    for tar_path in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    images[member.name.split(".")[0]] = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
    return images


@pytest.mark.parametrize("workers", [0, 2])
def test_one_pass_yields_every_sample_once_decoded_to_minus_one_one(demo_shards, workers):
    cfg = DataConfig(shards=str(demo_shards), resolution=16, workers=workers, shuffle=10, flip=False)
    loader, dataset = make_loader(cfg, batch_size=4, split="val")
    refs = reference_images(demo_shards, "val")
    seen = {}
    for images, keys in loader:
        assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32
        for image, key in zip(images, keys):
            seen[key] = image
    assert sorted(seen) == sorted(refs)
    for key, image in seen.items():
        expected = torch.from_numpy(refs[key].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
        torch.testing.assert_close(image, expected)
    assert dataset.skipped.count == 0


def test_ranks_get_disjoint_shards_covering_the_split(demo_shards):
    cfg = DataConfig(shards=str(demo_shards), resolution=16, workers=0, shuffle=0, flip=False)
    keys = [{k for _, k in ShardDataset(cfg, "train", rank, 2)} for rank in (0, 1)]
    assert not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == 40 and len(keys[0]) == 20


def test_flip_mirrors_about_half_of_the_images(demo_shards):
    base = {k: img for img, k in ShardDataset(DataConfig(shards=str(demo_shards), resolution=16, shuffle=0, flip=False), "train")}
    flipped = 0
    for img, key in ShardDataset(DataConfig(shards=str(demo_shards), resolution=16, shuffle=0, flip=True), "train"):
        if torch.equal(img, base[key].flip(-1)) and not torch.equal(img, base[key]):
            flipped += 1
        else:
            assert torch.equal(img, base[key])
    assert 8 <= flipped <= 32


def test_corrupt_sample_is_skipped_and_counted(tmp_path, demo_shards):
    out = tmp_path / "shards"
    out.mkdir()
    for path in demo_shards.glob("val-*.tar"):
        (out / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest))
    first = sorted(out.glob("val-*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(first, "w") as tar:
        damaged = False
        for member, data in members:
            if member.name.endswith(".png") and not damaged:
                data, damaged = b"\x89PNG garbage", True
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    dataset = ShardDataset(DataConfig(shards=str(out), resolution=16, shuffle=0), "val")
    assert len(list(dataset)) == 7
    assert dataset.skipped.count == 1


def test_too_few_shards_for_ranks_and_workers_is_a_clear_error(demo_shards):
    cfg = DataConfig(shards=str(demo_shards), resolution=16, workers=2)
    with pytest.raises(BricsError, match="2 'val' shards cannot feed 2 rank"):
        ShardDataset(cfg, "val", rank=0, world_size=2, num_workers=2)
    ShardDataset(DataConfig(shards=str(demo_shards), resolution=16, resample=True), "val", 0, 2, 2)  # resampling is fine


def test_resampled_stream_with_epoch_length(demo_shards):
    cfg = DataConfig(shards=str(demo_shards), resolution=16, workers=0, shuffle=0, resample=True, epoch_length=23)
    assert len(list(ShardDataset(cfg, "train"))) == 23


def test_shard_url_pattern_and_missing_folder(demo_shards, tmp_path):
    pattern = str(demo_shards / "val-{000000..000001}.tar")
    assert len(list(ShardDataset(DataConfig(shards=pattern, resolution=16, shuffle=0), "val"))) == 8
    from brics_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="manifest.json"):
        ShardDataset(DataConfig(shards=str(tmp_path), resolution=16), "train")
