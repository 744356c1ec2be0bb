"""Reconstruction metrics of Table 2: PSNR, SSIM and LPIPS per image, reported as mean and std.

Images are float tensors (B, 3, H, W) in [-1, 1], as the autoencoder sees them. PSNR uses
data_range = 2 (the span of [-1, 1]): the same number as data_range = 1 on [0, 1] images. SSIM is
torchmetrics' (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03), the library the paper names
(Suppl. F), computed on the images mapped to [0, 1] with data_range = 1 -- the standard definition;
torchmetrics averages over every pixel, borders mirrored (scikit-image drops a 5-pixel border, so it
differs in the third decimal). SSIM is not shift-invariant (its luminance term compares means), so
the authors' code, which fed [-1, 1] images to torchmetrics, reports different SSIM values. LPIPS
(`brics_cli.nets.perceptual.load_lpips`) uses the AlexNet backbone for evaluation, as in the
authors' code. std is the population std (ddof = 0) over images, Table 2's "mean +- std".
A pair whose input or reconstruction does not decode is left out and named ("unreadable"); past
`MAX_UNREADABLE` of the pairs no metric is reported. Under torchrun the ranks share the pairs in
whole batches (ranks.py): the per-pair values, and so the means, are one process's.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from brics_cli.core.images import ImageSkip, load_image
from brics_cli.core.runtime import Runtime
from brics_cli.errors import BricsError
from brics_cli.eval.ranks import batch_block, gather
from brics_cli.nets.perceptual import load_lpips
from brics_cli.nets.weights import LPIPS_WEIGHTS

DATA_RANGE = 2.0  # images in [-1, 1]


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) images in [-1, 1] -> (B,)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(DATA_RANGE**2 / mse)).float()  # identical images give +inf


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (torchmetrics, Gaussian 11x11, sigma 1.5) of (B, 3, H, W) images in [-1, 1] -> (B,)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    # On [0, 1] with data_range 1: the standard SSIM (the luminance term is not shift-invariant).
    x01, y01 = (x.float() + 1) / 2, (y.float() + 1) / 2
    return structural_similarity_index_measure(x01, y01, data_range=1.0, reduction="none")


def summarise(values: Sequence[float] | torch.Tensor) -> dict:
    """{"mean", "std"} over images (population std)."""
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    if t.numel() == 0:
        return {"mean": None, "std": None}
    return {"mean": t.mean().item(), "std": t.std(correction=0).item()}


class ReconstructionMeter:
    """Accumulates per-image PSNR, SSIM and (optionally) LPIPS over batches; `result()` gives the JSON shape."""

    def __init__(self, lpips_model: nn.Module | None = None, lpips_unavailable: str | None = None):
        self.lpips_model = lpips_model
        self.lpips_unavailable = lpips_unavailable or (None if lpips_model is not None else "no LPIPS model given")
        self.values: dict[str, list[float]] = {"psnr": [], "ssim": [], "lpips": []}

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, recons: torch.Tensor) -> None:
        if inputs.shape != recons.shape or inputs.dim() != 4 or inputs.shape[1] != 3:
            raise ValueError(f"expected two (B, 3, H, W) batches of equal shape, got {tuple(inputs.shape)} and {tuple(recons.shape)}")
        recons = recons.clamp(-1, 1)
        self.values["psnr"] += psnr(recons, inputs).tolist()
        self.values["ssim"] += ssim(recons, inputs).tolist()
        if self.lpips_model is not None:
            device = next(self.lpips_model.parameters()).device
            d = self.lpips_model(recons.to(device).float(), inputs.to(device).float())  # (B, 1, 1, 1)
            self.values["lpips"] += d.flatten().cpu().tolist()

    def result(self) -> dict:
        finite_psnr = [v for v in self.values["psnr"] if math.isfinite(v)]
        out = {
            "n": len(self.values["psnr"]),
            "psnr": summarise(finite_psnr),
            "ssim": summarise(self.values["ssim"]),
            "lpips": summarise(self.values["lpips"]) if self.lpips_model is not None else None,
        }
        if len(finite_psnr) < out["n"]:
            out["psnr_identical"] = out["n"] - len(finite_psnr)  # infinite PSNR, left out of the mean
        if self.lpips_model is None:
            out["lpips_unavailable"] = self.lpips_unavailable
        return out


def reconstruction_metrics(
    inputs: torch.Tensor | Iterable[torch.Tensor],
    recons: torch.Tensor | Iterable[torch.Tensor],
    lpips_model: nn.Module | None = None,
    lpips_unavailable: str | None = None,
) -> dict:
    """`{"n", "psnr": {"mean", "std"}, "ssim": {...}, "lpips": {...} | None, "lpips_unavailable": reason}`.

    `inputs` and `recons` are (N, 3, H, W) tensors in [-1, 1] or matching iterables of such batches.
    """
    meter = ReconstructionMeter(lpips_model, lpips_unavailable)
    if isinstance(inputs, torch.Tensor):
        inputs, recons = [inputs], [recons]
    for x, y in zip(inputs, recons, strict=True):
        meter.update(x, y)
    return meter.result()


def evaluate_folder(folder, lpips_net: str = "alex", device: str | torch.device = "cpu", batch_size: int = 32, progress=None,
                    rt: Runtime | None = None) -> dict:
    """`brics eval recon`: Table 2's metrics of a `brics reconstruct` folder (inputs/ and recon/), with the protocol
    (under torchrun, `rt`: the ranks share the pairs and each gets the result)."""
    from brics_cli.nets import weights
    from brics_cli.eval.generative import library_versions
    from brics_cli.eval.image_sets import reconstruction_pairs, unreadable_report

    pairs = reconstruction_pairs(folder)
    names = [] if lpips_net == "none" else list(LPIPS_WEIGHTS[lpips_net])
    model = None if lpips_net == "none" else load_lpips(lpips_net, device)
    found: dict[str, str] = {}
    result = evaluate_pairs(pairs, model, batch_size, progress("reconstructions", len(pairs)) if progress else None, found, rt)
    unreadable = unreadable_report("image pairs", len(pairs), found, f"rerun `brics reconstruct` into {folder} or remove those pairs")
    result["protocol"] = {
        "folder": str(folder),
        "n": result["n"],
        "unreadable": unreadable,
        "psnr": "per image, data_range 2 on [-1, 1] (= 1 on [0, 1])",
        "ssim": "torchmetrics, Gaussian 11x11 sigma 1.5, on [0, 1], mean over all pixels",
        "lpips": None if model is None else f"lpips v0.1 {lpips_net}",
        "std": "population (ddof 0) over images",
        "weights": [weights.describe(w) for w in names],
        "libraries": library_versions(),
        "device": str(device),
    }
    return result


def evaluate_pairs(pairs, lpips_model: nn.Module | None, batch_size: int = 32, progress=None,
                   unreadable: dict[str, str] | None = None, rt: Runtime | None = None) -> dict:
    """Reconstruction metrics of (input file, reconstruction file) pairs, in batches.

    A pair with a file that does not decode is dropped and recorded in `unreadable` (pair name ->
    "PATH: reason"); without that dict it is an error. Under torchrun (`rt`) each rank measures a
    block of whole batches and every rank gets the metrics of all the pairs.
    """
    meter = ReconstructionMeter(lpips_model, "LPIPS not requested" if lpips_model is None else None)
    rows = batch_block(len(pairs), batch_size, rt)

    def my_share() -> tuple[dict[str, list[float]], dict[str, str]]:
        found: dict[str, str] = {}
        for start in range(rows.start, rows.stop, batch_size):
            chunk = pairs[start : min(start + batch_size, rows.stop)]
            loaded = [pair for pair in (_load_pair(a, b, None if unreadable is None else found) for a, b in chunk) if pair is not None]
            if loaded:
                try:
                    meter.update(torch.stack([x for x, _ in loaded]), torch.stack([y for _, y in loaded]))
                except (RuntimeError, ValueError) as exc:  # sizes differ within a batch or between input and reconstruction
                    raise BricsError(f"images of different sizes among {chunk[0][0].name} .. {chunk[-1][0].name}: {exc}") from exc
            if progress is not None:
                progress(len(chunk))
        return meter.values, found

    parts = gather(rt, my_share)
    if progress is not None:
        progress(len(pairs) - len(rows))  # the other ranks' pairs
    meter.values = {key: [v for values, _ in parts for v in values[key]] for key in meter.values}  # blocks in rank order
    if unreadable is not None:
        for _, found in parts:
            unreadable.update(found)
    return meter.result()


def _load_pair(a, b, unreadable: dict[str, str] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Both images of a pair, or None (recorded in `unreadable`) when either does not decode."""
    try:
        return load_image(a), load_image(b)
    except ImageSkip as skip:
        if unreadable is None:
            raise BricsError(f"unreadable image {skip.detail}") from skip
        unreadable[a.name] = str(skip.detail)
        return None
