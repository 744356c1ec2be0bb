"""The training data loader: WebDataset shards -> batches of float images in [-1, 1].

    shard list -> permuted per epoch (the same permutation on every rank) -> split by rank (node)
    -> split by DataLoader worker -> tar -> samples -> shuffle buffer
    -> decode + crop/resize to data.resolution (data.resize) + optional horizontal flip -> (image (3, H, W), key)

`data.shards` is a folder written by `brics shard` (its manifest.json lists the shards of each
split) or a brace-expanded WebDataset URL (`pipe:`, http(s), object storage) for clusters that
stream shards, including shards written by other tools (img2dataset, `webdataset.ShardWriter`,
public releases): the image is the sample's `.png`, `.jpg`, `.jpeg` or `.webp` entry, every other
entry (`.cls`, `.txt`, `.json`) is ignored, and an image that is not `data.resolution` square is
centre-cropped (or randomly cropped, or refused: `data.resize`) and resized.

Every random choice of a reader -- the epoch's shard order, resampled shards, the shuffle buffer,
crops, flips -- comes from a generator seeded by a tuple such as (seed, epoch, rank, worker), so a
resumed run reads exactly what the uninterrupted run would have. The shard order depends on
(seed, epoch) only, the same on every rank, so the ranks' shares stay a partition of the shards.
A resampled stream (`data.resample=true`) is not split at all: each rank and worker draws its own
shards with replacement (WebDataset advises against splitting a resampled stream by worker).

Corrupt samples are skipped and counted, never fatal. With fewer shards than ranks x workers some
readers would get nothing -- WebDataset then raises "No samples found" or a distributed run
hangs -- so that case is refused up front with the fix. DataLoader workers ignore SIGINT, SIGTERM
and SIGUSR1: a scheduler signals the whole process group (SLURM on preemption, Ctrl-C in a
terminal) and the main process alone decides to checkpoint and stop, then shuts the workers down.
"""

from __future__ import annotations

import atexit
import itertools
import json
import multiprocessing as mp
import os
import random
import signal
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds

from brics_cli.core.signals import STOP_SIGNALS
from brics_cli.core.images import FORMAT_NAMES, array_to_tensor, center_crop_box, crop_resize, decode_rgb, random_crop_box
from brics_cli.data.config import DataConfig
from brics_cli.errors import BricsError, ConfigError

IMAGE_EXTS = tuple(FORMAT_NAMES)  # the sample keys that hold an image: png, jpg, jpeg, webp
WORKER_IGNORED_SIGNALS = STOP_SIGNALS  # exactly the signals the trainer turns into "checkpoint and exit 0"


def shard_urls(shards: str, split: str) -> list[str]:
    """The shard URLs of `split`: from a `brics shard` folder's manifest, or a brace pattern."""
    folder = Path(shards)
    if folder.is_dir():
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            raise ConfigError(f"data.shards: {folder} has no manifest.json; write it with `brics shard ... --out {folder}`")
        names = [n for n in json.loads(manifest.read_text())["shards"] if n.startswith(f"{split}-")]
        urls = [str(folder / n) for n in sorted(names)]
    else:
        import braceexpand

        urls = list(braceexpand.braceexpand(shards))
        if len(urls) == 1 and "://" not in shards and not shards.startswith("pipe:") and not Path(urls[0]).exists():
            raise ConfigError(f"data.shards: {shards} is neither a shard folder nor a shard URL pattern; make it with "
                              f"`brics shard SOURCE ... --out {shards}` (sources: `brics shard --help`) or set data.shards=PATH")
    if not urls:
        raise ConfigError(f"data.shards: no '{split}' shards in {shards}")
    return urls


def reader_rng(*parts: Any) -> random.Random:
    """A generator seeded by a tuple, e.g. (seed, epoch, rank, worker, "flip"): the same tuple gives the
    same stream in every process. A str seed is hashed with SHA-512, not Python's salted hash(), and
    unlike a sum such as seed + 7 * epoch + worker two different tuples never share a stream."""
    return random.Random(":".join(map(str, parts)))


class SkipCounter:
    """Corrupt samples seen by any DataLoader worker (a shared counter inherited by the workers)."""

    def __init__(self) -> None:
        self.value = mp.get_context("fork").Value("i", 0) if "fork" in mp.get_all_start_methods() else mp.Value("i", 0)

    def add(self, n: int = 1) -> None:
        with self.value.get_lock():
            self.value.value += n

    @property
    def count(self) -> int:
        return self.value.value


class WrongSizeSample(BricsError):
    """`data.resize=error` and a sample that is not data.resolution square: refused, not skipped."""


def decode_image(sample: dict[str, Any], resolution: int, resize: str = "center-crop", rng: random.Random | None = None) -> torch.Tensor:
    """Encoded image -> float tensor (3, resolution, resolution) in [-1, 1]; ValueError/ImageSkip for anything unusable.

    Another size is cropped to a square of its short side -- centred (LDM, clean-fid) or at a random
    position -- then resized with PIL's antialiased Lanczos filter (smaller images are upscaled).
    """
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"no image in sample (files: {sorted(k for k in sample if not k.startswith('__'))})")
    img, _ = decode_rgb(sample[ext])  # EXIF orientation, alpha over white, 16-bit: as `brics shard` reads them
    w, h = img.size
    if (w, h) != (resolution, resolution):
        if resize == "error":
            raise WrongSizeSample(
                f"data.resize=error: sample '{sample.get('__key__')}' in {sample.get('__url__')} is {w}x{h}, not "
                f"{resolution}x{resolution} (data.resolution); set data.resize=center-crop or random-crop to crop and resize it"
            )
        box = center_crop_box(w, h) if resize == "center-crop" else random_crop_box(w, h, min(w, h), rng or random.Random(0))
        img = crop_resize(img, box, resolution, small="upscale")
    return array_to_tensor(np.asarray(img))


_main_exiting = None  # set by the main process at exit; its forked workers read it in their signal handler


def _exit_flag():
    """A flag the forked workers share with this process, raised by an atexit hook. The hook is registered
    after multiprocessing's own, so it runs first: before multiprocessing terminates (SIGTERM) and joins
    the daemonic workers -- a worker that ignored that SIGTERM would hang the exit forever."""
    global _main_exiting
    if _main_exiting is None:
        _main_exiting = mp.get_context("fork").RawValue("b", 0)  # lock-free: read inside a signal handler
        atexit.register(lambda: setattr(_main_exiting, "value", 1))
    return _main_exiting


def _worker_signal(signum: int, frame) -> None:
    if signum == signal.SIGTERM and _main_exiting is not None and _main_exiting.value:
        signal.signal(signum, signal.SIG_DFL)  # the exiting main process terminates us: die as it expects
        os.kill(os.getpid(), signum)
    # Otherwise a signal to the whole process group: the main process decides when to stop.


def ignore_group_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a signal sent to the whole process group must not kill the worker.

    A worker keeps the default actions, so SLURM's SIGTERM to the job would kill it and the main
    process would die with "DataLoader worker (pid N) is killed by signal" before its checkpoint.
    SIGTERM still ends a worker once its main process is exiting (see `_exit_flag`).
    """
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, _worker_signal)


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples of one split for one rank; DataLoader workers split the rank's shards among them.

    Set `epoch` before iterating (the trainer does): it reseeds the shard order and every reader's
    random choices, so each epoch reads the shards in a new order.
    """

    def __init__(self, cfg: DataConfig, split: str = "train", rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.cfg, self.split, self.rank, self.world_size, self.seed = cfg, split, rank, world_size, seed
        self.urls = shard_urls(cfg.shards, split)
        readers = world_size * max(num_workers, 1)
        if not cfg.resample and len(self.urls) < readers:
            raise BricsError(
                f"{len(self.urls)} '{split}' shards cannot feed {world_size} rank(s) x {max(num_workers, 1)} worker(s): "
                f"reshard with a smaller --shard-size, use fewer data.workers, or set data.resample=true"
            )
        self.skipped = SkipCounter()
        self.epoch = 0

    def _handler(self, exc: Exception) -> bool:
        self.skipped.add()
        return True  # keep going

    def rank_shards(self) -> list[str]:
        """This epoch's shards of this rank, in reading order: every world_size-th of one permutation
        that depends on (seed, epoch) only -- the same on every rank, so the ranks' shares partition
        the shards. `data.shuffle: 0` keeps the listed order (evaluation, reconstruction, the code cache)."""
        urls = list(self.urls)
        if self.cfg.shuffle > 0:
            reader_rng(self.seed, self.epoch, "shards").shuffle(urls)
        return urls[self.rank :: self.world_size]

    def _shard_source(self, worker: int, num_workers: int):
        if self.cfg.resample:
            # Not split by worker: each reader draws its own endless stream with replacement.
            rng = reader_rng(self.seed, self.epoch, self.rank, worker, "resample")
            return lambda: (dict(url=rng.choice(self.urls)) for _ in itertools.count())
        shards = self.rank_shards()[worker::num_workers]
        return lambda: (dict(url=url) for url in shards)

    def _pipeline(self, worker: int, num_workers: int) -> wds.DataPipeline:
        stages = [self._shard_source(worker, num_workers), wds.tarfile_to_samples(handler=self._handler)]
        if self.cfg.shuffle > 0:
            rng = reader_rng(self.seed, self.epoch, self.rank, worker, "shuffle")
            stages.append(wds.shuffle(self.cfg.shuffle, initial=min(self.cfg.shuffle, 100), rng=rng))
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        flip_rng = reader_rng(self.seed, self.epoch, self.rank, worker, "flip")
        crop_rng = reader_rng(self.seed, self.epoch, self.rank, worker, "crop")
        produced = 0
        limit = self.cfg.epoch_length
        if limit is not None:  # per reader: the epoch's samples are spread over ranks and workers
            limit = -(-limit // (self.world_size * num_workers))
        for sample in self._pipeline(worker, num_workers):
            try:
                image = decode_image(sample, self.cfg.resolution, self.cfg.resize, crop_rng)
            except BricsError:
                raise  # data.resize=error: the user asked for a refusal, not a skip
            except Exception:  # corrupt sample: counted, not fatal
                self.skipped.add()
                continue
            if self.cfg.flip and flip_rng.random() < 0.5:
                image = image.flip(-1)
            yield image, sample["__key__"]
            produced += 1
            if limit is not None and produced >= limit:
                return


def _worker_error_line(message: str) -> str:
    """torch re-raises a worker's exception as "Caught X in DataLoader worker ...\\nOriginal Traceback ...
    module.X: <message>"; the user's one line is the last one, after the class name."""
    if not message.startswith("Caught ") or "\n" not in message:
        return message
    return message.rstrip().splitlines()[-1].partition(": ")[2]


class ShardLoader(torch.utils.data.DataLoader):
    """A DataLoader whose `BricsError`s from workers stay the one line the user is meant to read."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        except BricsError as exc:
            raise type(exc)(_worker_error_line(str(exc))) from exc


def make_loader(
    cfg: DataConfig, batch_size: int, split: str = "train", rank: int = 0, world_size: int = 1, seed: int = 0
) -> tuple[torch.utils.data.DataLoader, ShardDataset]:
    """A DataLoader over the split for this rank, and its dataset (for `skipped.count` and `epoch`)."""
    dataset = ShardDataset(cfg, split, rank, world_size, cfg.workers, seed)
    if cfg.workers > 0:
        _exit_flag()  # before the workers fork, so they inherit it
    loader = ShardLoader(
        dataset, batch_size=batch_size, num_workers=cfg.workers, drop_last=split == "train",
        persistent_workers=False, multiprocessing_context="fork" if cfg.workers > 0 else None,
        worker_init_fn=ignore_group_signals if cfg.workers > 0 else None,
        # Its own generator: creating an iterator then never draws from the global torch RNG, so a
        # resumed run's model noise continues exactly where the uninterrupted run's would be.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, dataset
