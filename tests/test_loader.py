"""The WebDataset training loader on shards written by `brics shard` (issue 3)."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brics_cli.cli import main
from brics_cli.data.config import DataConfig
from brics_cli.data.loader import ShardDataset, make_loader
from brics_cli.core import checkpoint as ckpt
from brics_cli.errors import BricsError
from conftest import TINY_RECIPE


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


# ---- issue 19: shards reshuffled per epoch, resampled streams, group signals ----------------------


def shard_of(key: str, shard_size: int = 5) -> int:
    return int(key) // shard_size  # `brics shard` numbers samples across shards: shard i holds 5i..5i+4


def test_shards_are_reshuffled_every_epoch_and_ranks_still_partition_them(demo_shards):
    cfg = DataConfig(shards=str(demo_shards), resolution=16, workers=0, shuffle=1, flip=False)  # buffer of 1: reading order
    ranks = [ShardDataset(cfg, "train", rank=rank, world_size=2, seed=3) for rank in (0, 1)]
    orders = []
    for epoch in (0, 1):
        shards, keys = [], []
        for dataset in ranks:
            dataset.epoch = epoch
            shards.append(dataset.rank_shards())
            read = [key for _, key in dataset]
            keys.append(read)
            assert list(dict.fromkeys(f"train-{shard_of(k):06d}.tar" for k in read)) == [Path(u).name for u in shards[-1]]
        assert sorted(shards[0] + shards[1]) == sorted(ranks[0].urls)  # every shard once, on one rank
        assert not set(keys[0]) & set(keys[1]) and len(keys[0] + keys[1]) == 40
        orders.append(shards[0] + shards[1])
    assert orders[0] != orders[1], "epoch 1 must read the shards in a new order"
    again = ShardDataset(cfg, "train", rank=0, world_size=2, seed=3)
    again.epoch = 1
    assert again.rank_shards() == orders[1][: len(again.rank_shards())]  # a resumed run reads the same order
    unshuffled = ShardDataset(DataConfig(shards=str(demo_shards), resolution=16, shuffle=0), "train", seed=3)
    unshuffled.epoch = 1
    assert unshuffled.rank_shards() == unshuffled.urls  # data.shuffle: 0 reads in listed order


def test_resampled_stream_gives_each_worker_its_own_reproducible_draw(demo_shards):
    cfg = DataConfig(shards=str(demo_shards), resolution=16, workers=2, shuffle=0, flip=False, resample=True, epoch_length=80)

    def shards_drawn(rank: int = 0, epoch: int = 0) -> list[list[int]]:
        loader, dataset = make_loader(cfg, batch_size=5, split="train", rank=rank, world_size=2, seed=5)
        dataset.epoch = epoch
        batches = [[shard_of(k) for k in keys] for _, keys in loader]  # a batch of 5 = one whole shard here
        return [[b[0] for b in batches[w::2]] for w in range(2)]  # the DataLoader takes batches from workers in turn

    first = shards_drawn()
    assert [len(w) for w in first] == [4, 4]  # 80 samples / 2 ranks / 2 workers = 4 shards of 5 per worker
    assert first[0] != first[1], "each worker draws its own shards (a resampled stream is not split by worker)"
    assert shards_drawn() == first  # the same (seed, epoch, rank, worker) draws the same stream
    assert shards_drawn(rank=1) != first and shards_drawn(epoch=1) != first


GROUP_SIGNALS_SCRIPT = textwrap.dedent("""
    import signal, sys, time
    from brics_cli.data.config import DataConfig
    from brics_cli.data.loader import make_loader

    received = []
    sent = int(sys.argv[2])
    loader, _ = make_loader(DataConfig(shards=sys.argv[1], resolution=16, workers=1, shuffle=0), 1, "train")
    for n, (images, keys) in enumerate(loader, 1):
        if n == 1:
            # Only the main process handles them, as a trainer would. Installed once the worker runs, so it
            # does not inherit these handlers: what keeps it alive must be the loader's own worker_init_fn.
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, lambda signum, frame: received.append(signum))
            print("reading", flush=True)
            while len(received) < sent:
                time.sleep(0.01)
    print(n, flush=True)
""")


@pytest.mark.parametrize("signals", [["SIGINT"], ["SIGTERM"], ["SIGUSR1"], ["SIGINT", "SIGTERM", "SIGUSR1"]])
def test_loader_workers_survive_sigint_sigterm_sigusr1_sent_to_the_process_group(demo_shards, signals):
    proc = subprocess.Popen([sys.executable, "-c", GROUP_SIGNALS_SCRIPT, str(demo_shards), str(len(signals))],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "reading\n"  # the worker is alive, mid-epoch, with batches still to make
    for name in signals:  # what Ctrl-C, SLURM's stop and its `--signal=USR1@90` warning send
        os.killpg(proc.pid, getattr(signal, name))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == "40\n"  # every sample of the epoch still arrived


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_whole_group_of_a_run_with_workers_checkpoints_and_exits_0(tmp_path, tiny_shards, sig):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "brics_cli", "ae-train", str(TINY_RECIPE), f"data.shards={tiny_shards}", "data.workers=1",
           "ae.train.steps=400", "ae.train.checkpoint_every=1000", "--out", str(run), "--json"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # like `setsid brics ...`
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (run / "metrics.jsonl").is_file():
        time.sleep(0.05)
    os.killpg(proc.pid, sig)  # `kill -TERM -- -PGID`: the trainer and its DataLoader worker alike
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["stopped_by"] == sig.name and 2 <= result["step"] < 400
    assert ckpt.CheckpointDir(run / "checkpoints").steps() == [result["step"]]
    assert "killed by signal" not in err and "rerun the same command" in err
