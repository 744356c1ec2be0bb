"""Image files -> feature matrices, through the feature extractors of the libraries the paper used.

An `Extractor` couples a per-image preprocessing step (PIL image -> uint8 tensor, in DataLoader
workers) with a network applied to uint8 batches that returns named (B, D) features:

- `inception`: torch-fidelity's InceptionV3 ("inception-v3-compat", TF FID weights) -> "2048"
  (pool3, FID and KID) and "logits_unbiased" (IS); it resizes inside, bilinear as TF 1.x, to 299.
- `vgg16`: torch-fidelity's VGG16 -> "fc2" (pre-ReLU, as the precision/recall code the paper used);
  bilinear as TF 1.x to 224 inside.
- `clip`: clean-fid's CLIP ViT-B/32 path (`CLIP_fx`, `img_preprocess_clip`: PIL bicubic resize of
  the short side to 224, centre crop, CLIP normalisation) -> "clip" (CLIP-FID).

Each loads its weight file through `weights.require_all` (never a download). Tests plug in other
`Extractor`s (real networks with fixed random weights) through the same path. Features of a set of
images are cached (`cached_features`), keyed by the set's fingerprint and the extractor (incl. its
weight sha256). A file that does not decode is left out and named (`extract(..., unreadable=)`);
the decoding runs in the DataLoader workers, so the failure is caught there, per file. Under
torchrun each rank extracts a block of whole batches and the blocks are gathered (ranks.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

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
    }


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
    a cache hit could not name them. Under torchrun (`rt`) each rank extracts a block of whole
    batches (ranks.py) and every rank gets all the features; rank 0 alone writes the cache.
    """
    key = hashlib.sha256(f"{fingerprint}:{len(files)}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"features-{extractor.cache_key()}-{key}.npz"
    cached = _read_cache(path, extractor.features)
    if everywhere(rt, cached is not None):  # one decision for all ranks: they meet in the same gathers
        return cached, True
    rows = batch_block(len(files), batch_size, rt)

    def my_share() -> tuple[dict[str, np.ndarray], dict[str, str]]:
        found: dict[str, str] = {}
        if not rows:
            return {}, found
        feats = extract([files[i] for i in rows], extractor, network_factory(), device, batch_size, workers, progress,
                        None if unreadable is None else found)
        return feats, found

    parts = gather(rt, my_share)
    if progress is not None:
        progress(len(files) - len(rows))  # the other ranks' images
    feats = {name: _stack_rows([p[name] for p, _ in parts if p]) for name in extractor.features}
    found = {name: reason for _, part in parts for name, reason in part.items()}  # in file order: blocks in rank order
    if found:
        unreadable.update(found)
        return feats, False
    if rt is None or rt.is_main:
        _write_cache(path, feats)
    return feats, False


def _stack_rows(blocks: list[np.ndarray]) -> np.ndarray:
    """Row blocks (N_i, D) -> (N, D); an empty block (a rank whose images were all unreadable) is left out."""
    blocks = [b for b in blocks if len(b)]
    return np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)


def _read_cache(path: Path, names: Sequence[str]) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path) as data:
        return {name: data[name] for name in names} if all(name in data for name in names) else None


def _write_cache(path: Path, feats: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **feats)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only folder: features are simply not cached
