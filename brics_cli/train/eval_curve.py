"""Metrics while the diffusion model trains: the paper's Fig. 11 (FID against training iterations).

Every `diffusion.train.eval_every` steps (and at the last step) `CurveEvaluator.evaluate` samples
`eval_samples` key codes with the EMA UNet: sample i from `sample_generator(eval_seed, i)`, the
same noise at every evaluation, so the curve measures the model and not the noise; `eval_sampler`
runs deterministically (eta = 0) in `eval_steps` steps. Then:

- `code_fd`, always (no weight file): the Frechet distance between features of these codes and of
  a fixed set of data codes -- `eval_samples` codes of the training-code cache, drawn once with
  `torch.randperm(N, generator=manual_seed(eval_seed))`. Training codes rather than the val split:
  the cache holds no val codes, a val split is small or absent (a shard URL pattern), and the
  paper's FID (and `fid` below) compares with the training images, so both numbers measure the
  distance to one distribution. `code_fd_data` is the distance between that reference and the next
  `eval_samples` codes of the permutation (when the cache has 2 x eval_samples): the floor two
  samples of the data reach, the value a perfect model would be expected to show.
  Features: the flattened code (C*H*W numbers) when that is fewer than the n codes compared, so the
  covariance has full rank; otherwise non-overlapping p x p patches of each code, one C*p*p feature
  vector per patch, p the largest power of two dividing H and W with C*p*p < n (p = 1: per-position
  channel statistics). The dimension stays below the number of codes -- the patches of one code are
  correlated, so it is codes that count as samples -- and the statistics keep the joint law of
  neighbouring code values, which the decoder reads together, pooled over positions. Both sets are
  rounded to float16, as the cache stores the data codes.
- `fid`, when torch-fidelity's Inception file is present: the codes decoded with the EMA
  autoencoder, rounded to 8 bits as `brics sample` writes them, Inception pool3 features, and the
  Frechet distance to the statistics of the training split's images (the paper's reference). Those
  features are extracted once into `brics eval`'s feature cache ($BRICS_CACHE_DIR/features, keyed by
  the shard manifest and the weights' sha256), so later runs and `brics eval fid` reuse them.
  Without the file, or without a shard folder to export, one note says that FID is skipped and why.

Under torchrun each rank samples, decodes and measures a contiguous block of whole `eval_batch`
batches (`eval.ranks.batch_block`): the batches one process forms, so every code goes through the
UNet in the same batch on any number of ranks and the numbers do not depend on the world size.
The blocks are gathered, rank 0 computes the distances and sends the record to all, so every rank
leaves together. The training RNG is not touched (exact resume).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from brics_cli.core.files import atomic_write_bytes
from brics_cli.core.images import to_uint8
from brics_cli.core.runtime import Runtime
from brics_cli.diffusion.config import DiffusionTrainConfig
from brics_cli.diffusion.loss import x0_to_codes
from brics_cli.diffusion.samplers import sample_generators
from brics_cli.eval.features import cached_features, production_extractors
from brics_cli.eval.image_sets import cache_root, load_reference, unreadable_report
from brics_cli.eval.metrics import feature_statistics, frechet_distance
from brics_cli.eval.ranks import batch_block, everywhere, failing_together, from_main, gather
from brics_cli.nets import weights
from brics_cli.registry import SAMPLERS

INCEPTION = "inception-fidelity"


def code_patch(shape: tuple[int, int, int], n: int) -> int | None:
    """The patch side p of the code features for n codes per set; None: the flattened code."""
    C, H, W = shape
    if C * H * W < n:
        return None
    p = 1
    while H % (2 * p) == 0 and W % (2 * p) == 0 and C * (2 * p) ** 2 < n:
        p *= 2
    return p


def code_features(codes: Tensor, patch: int | None) -> Tensor:
    """Codes (N, C, H, W) -> float64 features: (N, C*H*W) flattened, or (N * H/p * W/p, C*p*p) patches."""
    if patch is None:
        return codes.reshape(len(codes), -1).double()
    N, C, H, W = codes.shape
    p = patch
    x = codes.double().reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, H/p, W/p, C, p, p)
    return x.reshape(-1, C * p * p)


def describe_features(shape: tuple[int, int, int], patch: int | None) -> str:
    C, H, W = shape
    if patch is None:
        return f"flattened codes ({C * H * W}-d)"
    if patch == 1:
        return f"per-position channel vectors ({C}-d, {H * W} per code)"
    return f"{patch}x{patch} code patches ({C * patch * patch}-d, {(H // patch) * (W // patch)} per code)"


class CurveEvaluator:
    """The in-training evaluation of one diffusion run; `evaluate` is a collective (every rank calls it)."""

    def __init__(self, tc: DiffusionTrainConfig, schedule, shape: tuple[int, int, int], codes: Tensor, clip_x0: bool,
                 autoencoder: Callable[[], Any], shards: str, rt: Runtime) -> None:
        self.tc, self.schedule, self.shape, self.clip_x0, self.rt = tc, schedule, shape, clip_x0, rt
        self.autoencoder, self.shards = autoencoder, shards
        self.n_ref = min(tc.eval_samples, len(codes))
        self.patch = code_patch(shape, self.n_ref)
        self.features = describe_features(shape, self.patch)
        self.reference: tuple[Tensor, Tensor] | None = None  # (mu, sigma) of the reference codes, rank 0
        self.data_floor: float | None = None
        if rt.is_main:
            order = torch.randperm(len(codes), generator=torch.Generator().manual_seed(tc.eval_seed))
            self.reference = self._code_statistics(codes[order[:self.n_ref]])
            if len(codes) >= 2 * self.n_ref:
                self.data_floor = frechet_distance(*self.reference, *self._code_statistics(codes[order[self.n_ref:2 * self.n_ref]]))
        self.inception = None  # torch-fidelity's network once FID is on
        self.fid_reference: tuple[Tensor, Tensor] | None = None  # rank 0
        self.fid_images = 0

    def _device(self) -> torch.device:
        return self.rt.device if self.rt.device.type == "cuda" else torch.device("cpu")  # float64 statistics

    def _code_statistics(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        return feature_statistics(code_features(codes.to(self._device()), self.patch))

    def prepare_fid(self) -> str:
        """Load Inception and the training images' statistics (a collective); returns what to log:
        how FID is measured, or why it is skipped. A file that is not the published one stops the
        run here (exit 1, as in `brics eval`) unless BRICS_ALLOW_UNVERIFIED_WEIGHTS=1."""
        with failing_together(self.rt):
            if not everywhere(self.rt, weights.locate(INCEPTION) is not None):
                return (f"FID skipped: {weights.candidates(INCEPTION)[0]} (torch-fidelity's Inception weights) is missing; "
                        "only the code-space Frechet distance is logged (`brics weights status` says where the file goes)")
            if not everywhere(self.rt, (Path(self.shards) / "manifest.json").is_file()):
                return f"FID skipped: data.shards {self.shards} is not a `brics shard` folder, so there are no reference images to export"
            extractor = production_extractors()["inception"]
            self.inception = extractor.load(self.rt.device)
            reference = from_main(self.rt, lambda: load_reference(self.shards, "train"))
            found: dict[str, str] = {}
            feats, _ = cached_features(reference.files, reference.fingerprint, cache_root() / "features", extractor,
                                       lambda: self.inception, found, device=self.rt.device, batch_size=self.tc.eval_batch,
                                       rt=self.rt)
            unreadable_report("reference images", len(reference.files), found, reference.repair_hint())
            self.fid_images = len(reference.files) - len(found)
            if self.rt.is_main:
                self.fid_reference = feature_statistics(torch.from_numpy(feats["2048"]).to(self._device()))
        return f"FID against the Inception statistics of {self.fid_images} training images ({reference.path})"

    @torch.no_grad()
    def _my_share(self, unet) -> tuple[Tensor, Tensor | None]:
        """This rank's block of samples: float16 codes (b, C, H, W) and, with FID on, Inception features (b, 2048)."""
        tc, device = self.tc, self.rt.device
        rows = batch_block(tc.eval_samples, tc.eval_batch, self.rt)
        sampler = SAMPLERS.get(tc.eval_sampler)
        codes, feats = [torch.zeros((0, *self.shape), dtype=torch.float16)], []
        for start in range(rows.start, rows.stop, tc.eval_batch):
            batch = range(start, min(start + tc.eval_batch, rows.stop))
            x0 = sampler(unet, self.schedule, self.shape, steps=tc.eval_steps, generators=sample_generators(tc.eval_seed, batch),
                         eta=0.0, clip_x0=self.clip_x0, device=device)
            z = x0_to_codes(x0).to(torch.float16)  # (b, C, H, W), as the data codes are cached
            codes.append(z.cpu())
            if self.inception is not None:
                images = to_uint8(self.autoencoder().decode(z.float()))  # (b, 3, H, W) uint8: the PNG `brics sample` writes
                feats.append(self.inception(images)["2048"].float().cpu())
        return torch.cat(codes), (torch.cat(feats) if feats else None)

    def _measure(self, parts: list[tuple[Tensor, Tensor | None]]) -> dict[str, Any]:
        """On rank 0: the distances of the gathered samples (rank order = index order)."""
        codes = torch.cat([c for c, _ in parts])
        record: dict[str, Any] = {"code_fd": frechet_distance(*self._code_statistics(codes), *self.reference)}
        if self.data_floor is not None:
            record["code_fd_data"] = self.data_floor
        if self.fid_reference is not None:
            feats = torch.cat([f for _, f in parts if f is not None]).to(self._device())
            record["fid"] = frechet_distance(*feature_statistics(feats), *self.fid_reference)
            record["fid_reference_images"] = self.fid_images
        record.update(samples=len(codes), reference_codes=self.n_ref, code_features=self.features,
                      sampler=self.tc.eval_sampler, sampler_steps=self.tc.eval_steps, seed=self.tc.eval_seed)
        return record

    def evaluate(self, unet) -> dict[str, Any]:
        """Sample, measure, and return the record (on every rank); `unet` is the EMA model."""
        t0 = time.perf_counter()
        devices = [self.rt.device] if self.rt.device.type == "cuda" else []
        with failing_together(self.rt), torch.random.fork_rng(devices=devices):  # the training RNG stays where it was
            parts = gather(self.rt, lambda: self._my_share(unet))
            record = from_main(self.rt, lambda: self._measure(parts))
        record["seconds"] = round(time.perf_counter() - t0, 3)
        return record


def describe_record(e: dict[str, Any]) -> str:
    """One evaluation in words, for the training log."""
    floor = f" (two data samples: {e['code_fd_data']:.4g})" if "code_fd_data" in e else ""
    fid = f", FID {e['fid']:.4g}" if "fid" in e else ""
    return f"code FD {e['code_fd']:.4g}{floor}{fid} over {e['samples']} samples ({e['sampler']}, {e['sampler_steps']} steps)"


def redraw_curve(records: list[dict[str, Any]], path: Path) -> None:
    """eval-curve.png from the evaluation records among `records`; removed when none is left (all rolled back)."""
    points = [r for r in records if "eval" in r]
    if points:
        write_curve(points, path)
    else:
        path.unlink(missing_ok=True)


def write_curve(records: list[dict[str, Any]], path: Path) -> None:
    """eval-curve.png: the code-space Frechet distance (and FID, when measured) against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, evals = [r["step"] for r in records], [r["eval"] for r in records]
    fid = [(s, e["fid"]) for s, e in zip(steps, evals) if "fid" in e]
    fig, axes = plt.subplots(1, 2 if fid else 1, figsize=(10 if fid else 5, 3.4), squeeze=False)
    code_ax = axes[0][0]
    code_ax.plot(steps, [e["code_fd"] for e in evals], marker="o", label="EMA samples")
    floor = next((e["code_fd_data"] for e in reversed(evals) if "code_fd_data" in e), None)
    if floor is not None:  # what two samples of the data score: where a perfect model would level off
        code_ax.axhline(floor, color="gray", linestyle="--", label="two data samples")
        code_ax.legend(fontsize=8)
    code_ax.set_title(f"code-space Frechet distance ({evals[-1]['samples']} samples)", fontsize=9)
    if all(e["code_fd"] > 0 for e in evals) and (floor is None or floor > 0):
        code_ax.set_yscale("log")  # a distance that falls by orders of magnitude as training goes on
    if fid:
        axes[0][1].plot(*zip(*fid), marker="o", color="#c44e52")
        axes[0][1].set_title(f"FID ({evals[-1]['samples']} samples vs the training images)", fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel("training step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())  # rewritten whole at each evaluation: never half a PNG
