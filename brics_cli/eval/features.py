"""Image files -> feature matrices, through the feature extractors of the libraries the paper used.

An `Extractor` couples a per-image preprocessing step (PIL image -> uint8 tensor, in DataLoader
workers) with a network applied to uint8 batches that returns named (B, D) features:

- `inception`: torch-fidelity's InceptionV3 ("inception-v3-compat", TF FID weights) -> "2048"
  (pool3, FID and KID) and "logits_unbiased" (IS); it resizes inside, bilinear as TF 1.x, to 299.
- `vgg16`: torch-fidelity's VGG16 -> "fc2" (pre-ReLU, as the precision/recall code the paper used);
  bilinear as TF 1.x to 224 inside.
- `clip`: clean-fid's CLIP ViT-B/32 path (`CLIP_fx`, `img_preprocess_clip`: PIL bicubic resize of
  the short side to 224, centre crop, CLIP normalisation) -> "clip" (CLIP-FID).
- `dinov2`: DINOv2 ViT-L/14 as EDM2 feeds it (dinov2.py: bicubic + antialias resize to 224, ImageNet
  normalisation) -> "dinov2", the normalised class token (FD-DINOv2).

Each loads its weight file through `weights.require_all` (never a download). Tests plug in other
`Extractor`s (real networks with fixed random weights) through the same path. Features of a set of
images are cached (`cached_features`), keyed by the set's fingerprint and the extractor (incl. its
weight sha256). Parallel processes filling one cache file take turns through a file lock
(`<cache>/locks/features-FILE.lock`), the second then reading what the first wrote; every cache file
is written to a temporary name and renamed into place, so a reader never sees a partial one. A file
that does not decode is left out and named (`extract(..., unreadable=)`); the decoding runs in the
DataLoader workers, so the failure is caught there, per file. Under
torchrun each rank extracts a block of whole batches and the blocks are gathered (ranks.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from brics_cli.core.files import atomic_write_bytes
from brics_cli.core.runtime import Runtime
from brics_cli.errors import BricsError
from brics_cli.eval.ranks import batch_block, everywhere, gather
from brics_cli.nets import weights


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W), exactly as torch-fidelity's image-folder input reads files."""
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


@dataclass
class Extractor:
    name: str  # recorded in the protocol
    features: tuple[str, ...]
    build: Callable[[dict[str, Path], torch.device], Callable[[torch.Tensor], dict[str, torch.Tensor]]]
    weights: tuple[str, ...] = ()  # catalogue names `build` receives as {name: path}
    preprocess: Callable[[Image.Image], torch.Tensor] = pil_to_uint8
    resize: str = ""  # how images reach the network's input size, for the protocol
    version: str = "1"  # part of the cache key: bump when preprocessing or outputs change

    def load(self, device: torch.device):
        return self.build(weights.require_all(self.weights), device)

    def cache_key(self) -> str:
        shas = [weights.describe(n)["sha256"] for n in self.weights]  # memoised hashes
        return hashlib.sha256(json.dumps([self.name, self.features, self.version, shas]).encode()).hexdigest()[:16]


def _fidelity_inception(paths, device):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    names = ["2048", "logits_unbiased"]
    net = FeatureExtractorInceptionV3("inception-v3-compat", names, feature_extractor_weights_path=str(paths["inception-fidelity"]))
    net = net.to(device)
    return lambda x: dict(zip(names, net(x)))


def _fidelity_vgg16(paths, device):
    from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16

    net = FeatureExtractorVGG16("vgg16", ["fc2"], feature_extractor_weights_path=str(paths["vgg16"])).to(device)
    return lambda x: {"fc2": net(x)[0]}


@lru_cache(maxsize=1)
def cleanfid_clip_module():
    """`cleanfid.clip_features`, which imports `clip`; the `clip` package still does
    `from pkg_resources import packaging`, gone from setuptools >= 81. Where it is missing, a stand-in
    holding just `packaging` exists while `clip` is imported, and is removed right after."""
    import importlib
    import sys
    import types

    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import packaging.version

        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)  # type: ignore[assignment]
        try:
            return importlib.import_module("cleanfid.clip_features")
        finally:
            sys.modules.pop("pkg_resources", None)
    return importlib.import_module("cleanfid.clip_features")


def _cleanfid_clip(paths, device):
    model = cleanfid_clip_module().CLIP_fx(name=str(paths["clip-vit-b-32"]), device=str(device))  # clip.load takes a file
    return lambda x: {"clip": model(x.float()).float()}


def _clip_preprocess(img: Image.Image) -> torch.Tensor:
    resized = cleanfid_clip_module().img_preprocess_clip(np.array(img.convert("RGB")))
    return torch.from_numpy(resized).permute(2, 0, 1).contiguous()


def production_extractors() -> dict[str, Extractor]:
    return {
        "inception": Extractor(
            "torch-fidelity inception-v3-compat", ("2048", "logits_unbiased"), _fidelity_inception, ("inception-fidelity",),
            resize="torch-fidelity: bilinear (TF 1.x compatible) to 299x299 inside the network",
        ),
        "vgg16": Extractor(
            "torch-fidelity vgg16 fc2", ("fc2",), _fidelity_vgg16, ("vgg16",),
            resize="torch-fidelity: bilinear (TF 1.x compatible) to 224x224 inside the network",
        ),
        "clip": Extractor(
            "clean-fid clip_vit_b_32", ("clip",), _cleanfid_clip, ("clip-vit-b-32",), preprocess=_clip_preprocess,
            resize="clean-fid: PIL bicubic resize of the short side to 224, centre crop 224x224",
        ),
        "dinov2": Extractor(
            "DINOv2 ViT-L/14 (dinov2_vitl14), EDM2 protocol", ("dinov2",), _dinov2, ("dinov2-vit-l-14",),
            resize="EDM2: torch bicubic with antialias to 224x224 (aspect not kept), /255, ImageNet mean/std; "
                   "feature: class token after the final LayerNorm (1024-d)",
        ),
    }


def _dinov2(paths, device):
    from brics_cli.eval.dinov2 import dinov2_network

    return dinov2_network(paths, device)


class ImageFiles(torch.utils.data.Dataset):
    """(index, preprocessed image) per file, or (index, "PATH: reason") for a file that does not decode:
    one bad file is data to count, not a crashed DataLoader worker."""

    def __init__(self, files: Sequence[Path], preprocess):
        self.files, self.preprocess = list(files), preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        try:
            with Image.open(self.files[i]) as img:
                rgb = img.convert("RGB")  # decodes every pixel, so a truncated file fails here
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, EOFError... for bad bytes
            return i, f"{self.files[i]}: {type(exc).__name__}: {exc}"
        return i, self.preprocess(rgb)


def collate_readable(items: list[tuple[int, torch.Tensor | str]]) -> tuple[torch.Tensor | None, list[tuple[int, str]]]:
    """A batch of `ImageFiles` items -> ((B, 3, H, W) uint8 of the decoded ones or None, [(index, reason)] of the others)."""
    images = [x for _, x in items if not isinstance(x, str)]
    failed = [(i, x) for i, x in items if isinstance(x, str)]
    return (torch.stack(images) if images else None), failed


def extract(
    files: Sequence[Path],
    extractor: Extractor,
    network,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
    unreadable: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Run `network` (from `extractor.load`) over the files in order -> {feature name: (N, D) float32}.

    A file that does not decode is left out of the rows and recorded in `unreadable` (file name ->
    "PATH: reason"); without that dict it is an error.
    """
    loader = torch.utils.data.DataLoader(ImageFiles(files, extractor.preprocess), batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_readable)
    out: dict[str, list[np.ndarray]] = {name: [] for name in extractor.features}
    try:
        with torch.no_grad():
            for batch, failed in loader:
                for i, reason in failed:
                    if unreadable is None:
                        raise BricsError(f"unreadable image {reason}")
                    unreadable[files[i].name] = reason
                if batch is not None:
                    feats = network(batch.to(device))
                    for name in extractor.features:
                        out[name].append(feats[name].detach().float().cpu().numpy())
                if progress is not None:
                    progress(len(failed) + (0 if batch is None else batch.shape[0]))
    except RuntimeError as exc:
        if "stack expects each tensor to be equal size" in str(exc):
            raise BricsError(f"images of different sizes among {files[0].parent}: every image of a set must have one size") from exc
        raise
    return {name: np.concatenate(parts) if parts else np.zeros((0, 0), np.float32) for name, parts in out.items()}


def cached_features(
    files: Sequence[Path],
    fingerprint: str,
    cache_dir: Path,
    extractor: Extractor,
    network_factory: Callable[[], Callable],
    unreadable: dict[str, str] | None = None,
    *,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
    rt: Runtime | None = None,
) -> tuple[dict[str, np.ndarray], bool]:
    """Features of `files` from `cache_dir` if this set and extractor were seen before; else extracted and stored.

    Returns (features, cache_hit). `network_factory` is called only on a miss. Unreadable files are
    recorded in `unreadable` (see `extract`); features of a set with unreadable files are not cached:
    a cache hit could not name them. A miss is filled under the cache file's lock (`fill_lock`), so
    a second process asking for the same features waits and then reads them. Under torchrun (`rt`)
    each rank extracts a block of whole batches (ranks.py) and every rank gets all the features;
    rank 0 alone holds the lock and writes the cache.
    """
    key = hashlib.sha256(f"{fingerprint}:{len(files)}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"features-{extractor.cache_key()}-{key}.npz"
    cached = _read_cache(path, extractor.features)
    if everywhere(rt, cached is not None):  # one decision for all ranks: they meet in the same gathers
        return cached, True
    with fill_lock(path, rt):
        cached = _read_cache(path, extractor.features)  # filled by the process we waited for?
        if everywhere(rt, cached is not None):
            return cached, True
        feats, found = _extract_shared(files, extractor, network_factory, unreadable is not None, device, batch_size, workers,
                                       progress, rt)
        if found:
            unreadable.update(found)
            return feats, False
        if rt is None or rt.is_main:
            _write_cache(path, feats)
    return feats, False


def _extract_shared(files, extractor, network_factory, tolerate_unreadable, device, batch_size, workers, progress, rt):
    """(features of every file, {name: reason} of the unreadable ones): each rank extracts its block, gathered in order."""
    rows = batch_block(len(files), batch_size, rt)

    def my_share() -> tuple[dict[str, np.ndarray], dict[str, str]]:
        found: dict[str, str] = {}
        if not rows:
            return {}, found
        feats = extract([files[i] for i in rows], extractor, network_factory(), device, batch_size, workers, progress,
                        found if tolerate_unreadable else None)
        return feats, found

    parts = gather(rt, my_share)
    if progress is not None:
        progress(len(files) - len(rows))  # the other ranks' images
    feats = {name: _stack_rows([p[name] for p, _ in parts if p]) for name in extractor.features}
    found = {name: reason for _, part in parts for name, reason in part.items()}  # in file order: blocks in rank order
    return feats, found


def lock_path(path: Path) -> Path:
    """Where the fill lock of cache entry `path` lives: `<cache>/locks/<folder>-<name>.lock`, beside the data
    folders rather than in them (a lock file outlives its holder: deleting it would let two holders in)."""
    path = Path(path)
    return path.parent.parent / "locks" / f"{path.parent.name}-{path.name}.lock"


@contextmanager
def fill_lock(path: Path, rt: Runtime | None = None):
    """Hold `lock_path(path)` (an flock, released by the kernel if the holder dies) while `path` is filled;
    rank 0 alone under torchrun. Waits for another holder, saying so once. No lock where the cache cannot be
    written: nothing is cached there either."""
    lock = None
    if rt is None or rt.is_main:
        lock = _acquire(Path(path))
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _acquire(path: Path):
    from filelock import FileLock, Timeout

    try:
        where = lock_path(path)
        where.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(where))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"note: another process is filling {path}; waiting for it", file=sys.stderr)
            lock.acquire()
    except OSError:  # a read-only cache: work without it
        return None
    return lock


def _stack_rows(blocks: list[np.ndarray]) -> np.ndarray:
    """Row blocks (N_i, D) -> (N, D); an empty block (a rank whose images were all unreadable) is left out."""
    blocks = [b for b in blocks if len(b)]
    return np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)


def _read_cache(path: Path, names: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The cached features, or None when absent or unreadable (a file cut short before writes were atomic: refilled)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return {name: data[name] for name in names} if all(name in data for name in names) else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez` to a temporary name beside `path`, then renamed over it (core/files.py): never a partial file."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(Path(path), buffer.getbuffer())


def _write_cache(path: Path, feats: dict[str, np.ndarray]) -> None:
    try:
        save_npz_atomic(path, feats)
    except OSError:
        pass  # a read-only folder or a full disk: features are simply not cached
