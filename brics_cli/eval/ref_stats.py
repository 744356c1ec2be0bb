"""Reference statistics (`brics eval stats`): a reference set reduced once, with its provenance, then read by
every metric command through `--ref-stats FILE` instead of the reference images (EDM2's dataset-ref files).

FILE is one `.npz` (plain arrays: `np.load(FILE)` reads it without pickle):

- `provenance`: a JSON string -- the format, when, the reference (kind, path, shard folder, split, manifest
  sha256, fingerprint, image count, unreadable images), per network its extractor, feature, resize policy,
  weight files with their sha256 and what is stored, the networks skipped and why, library versions, device;
- `NET/FEATURE/mu` (D,) and `NET/FEATURE/sigma` (D, D), float64, covariance with ddof 1, for
  `inception/2048` (FID), `clip/clip` (CLIP-FID) and `dinov2/dinov2` (FD-DINOv2);
- `inception/2048/features` (N, 2048) float32 for KID, `clip/clip/features` (N, 512) for clean-fid's KID
  file, and `vgg16/fc2/features` (N, 4096) float32 with
  `vgg16/fc2/radii` (N,) float64 -- each feature's squared distance to its k-th (k = 3) nearest other one -- for
  precision/recall, which need every reference point, not a Gaussian. `--moments-only` leaves these out (a
  small file; KID and prc then need the images).

A network whose weight file is absent is skipped with a note in `provenance.skipped` unless it was asked for
with `--networks`. clean-fid's CLIP-FID path is brics' CLIP path, so the CLIP statistics are also written as
clean-fid's `make_custom_stats(NAME, ..., mode="clean", model_name="clip_vit_b_32")` writes them:
`cleanfid/NAME_clean_clip_vit_b_32_custom_na.npz` (mu, sigma) and `..._custom_na_kid.npz` (feats) beside FILE
(NAME = FILE's stem, lower case, as clean-fid lowercases it). clean-fid's Inception statistics would come from
another network and resize (its TorchScript Inception, PIL bicubic) than brics' FID (torch-fidelity's), so
none are written for it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brics_cli.core.files import sha256_file
from brics_cli.errors import ConfigError
from brics_cli.eval import metrics as M
from brics_cli.eval.features import Extractor, save_npz_atomic
from brics_cli.eval.image_sets import ImageSet, unreadable_report
from brics_cli.nets import weights

FORMAT = "brics-ref-stats/1"
NETWORKS = ("inception", "clip", "dinov2", "vgg16")
STORED = {  # network -> (feature, what): "moments" = mu + sigma, "features" = the (N, D) rows, "radii" = their k-NN radii
    "inception": (("2048", "moments"), ("2048", "features")),
    "clip": (("clip", "moments"), ("clip", "features")),  # features: clean-fid's custom KID file
    "dinov2": (("dinov2", "moments"),),
    "vgg16": (("fc2", "features"), ("fc2", "radii")),
}
CLEANFID_MODEL = "clip_vit_b_32"


@dataclass
class RefStats:
    """A stats file, read: its provenance and arrays (keys `NET/FEATURE/mu|sigma|features|radii`)."""

    path: Path
    sha256: str
    provenance: dict
    arrays: dict[str, np.ndarray]

    def has(self, network: str, feature: str, what: str) -> bool:
        keys = (f"{network}/{feature}/mu", f"{network}/{feature}/sigma") if what == "moments" else (f"{network}/{feature}/{what}",)
        return all(k in self.arrays for k in keys)

    def moments(self, network: str, feature: str) -> tuple[np.ndarray, np.ndarray]:
        return self.arrays[f"{network}/{feature}/mu"], self.arrays[f"{network}/{feature}/sigma"]

    @property
    def n_images(self) -> int:
        return int(self.provenance["reference"]["n_images"])

    def check(self, needs: list[tuple[str, str, str]], extractors: dict[str, Extractor]) -> None:
        """Refuse (ConfigError) when an array a metric needs is not stored, or was made by other weights or preprocessing."""
        for network, feature, what in needs:
            if not self.has(network, feature, what):
                skipped = self.provenance.get("skipped", {}).get(network)
                why = f" ({network} was skipped: {skipped})" if skipped else (" (made with --moments-only)" if what != "moments" else "")
                raise ConfigError(f"--ref-stats {self.path} holds no {network} {what}{why}; make it again with "
                                  f"`brics eval stats --ref ... --networks {network}`, or pass --ref instead")
            made = self.provenance["networks"][network]
            if made["cache_key"] != extractors[network].cache_key():
                shas = ", ".join(w.get("sha256", "?")[:12] for w in made["weights"])
                raise ConfigError(f"--ref-stats {self.path}: its {network} features come from other weights or preprocessing "
                                  f"(weights sha256 {shas}... , extractor {made['extractor']}) than this machine's; "
                                  "make the statistics again here")

    def record(self) -> dict:
        """The protocol's `reference` entry for metrics computed against this file."""
        ref = self.provenance["reference"]
        return {"kind": "stats", "path": str(self.path), "sha256": self.sha256, "made_from": ref, "created": self.provenance.get("created"),
                "split": ref.get("split"), "manifest_sha256": ref.get("manifest_sha256"), "fingerprint": ref.get("fingerprint")}

    def source(self) -> str:
        """The reference the statistics were made from: its shard folder, else its image folder."""
        ref = self.provenance["reference"]
        return ref.get("source") or ref["path"]


def load_ref_stats(path: Path) -> RefStats:
    if not Path(path).is_file():
        raise ConfigError(f"--ref-stats: file not found: {path} (make one with `brics eval stats --ref SHARDS --out {path}`)")
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # not a zip, truncated, not numpy
        raise ConfigError(f"--ref-stats {path} is not a statistics file written by `brics eval stats` ({type(exc).__name__}: {exc})") from exc
    if "provenance" not in arrays:
        raise ConfigError(f"--ref-stats {path} has no provenance: not written by `brics eval stats`")
    provenance = json.loads(str(arrays.pop("provenance")))
    if provenance.get("format") != FORMAT:
        raise ConfigError(f"--ref-stats {path} has format {provenance.get('format')!r}; this brics reads {FORMAT!r}")
    return RefStats(Path(path), sha256_file(Path(path)), provenance, arrays)


def choose_networks(asked: list[str] | None, extractors: dict[str, Extractor]) -> tuple[list[str], dict[str, str]]:
    """(networks to compute, {skipped network: why}). Asked ones must have their weights (checked by the caller);
    by default every network, those whose weight files are absent skipped."""
    if asked is not None:
        unknown = [n for n in asked if n not in NETWORKS]
        if unknown or not asked:
            raise ConfigError(f"--networks: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(NETWORKS)}")
        return list(dict.fromkeys(asked)), {}
    chosen, skipped = [], {}
    for name in NETWORKS:
        absent = [weights.entry(w).filename for w in extractors[name].weights if weights.locate(w) is None]
        if absent:
            skipped[name] = f"weight file {', '.join(absent)} absent (see `brics weights status`)"
        else:
            chosen.append(name)
    if not chosen:
        weights.require_all([w for n in NETWORKS for w in extractors[n].weights])  # raises: one line naming every file
    return chosen, skipped


def reduce_features(network: str, feats: dict[str, np.ndarray], moments_only: bool, device: torch.device) -> dict[str, np.ndarray]:
    """The arrays stored for one network's features (see STORED)."""
    out = {}
    for feature, what in STORED[network]:
        f = feats[feature]
        if what == "moments":
            mu, sigma = M.feature_statistics(torch.from_numpy(f))
            out[f"{network}/{feature}/mu"], out[f"{network}/{feature}/sigma"] = mu.numpy(), sigma.numpy()
        elif moments_only:
            continue
        elif what == "features":
            out[f"{network}/{feature}/features"] = f.astype(np.float32)
        elif what == "radii":
            out[f"{network}/{feature}/radii"] = M.knn_radii(torch.from_numpy(f).to(device), M.PRC_K).cpu().numpy()
    return out


def provenance(reference: ImageSet, networks: list[str], skipped: dict[str, str], extractors: dict[str, Extractor],
               unreadable: dict, moments_only: bool, device, libraries: dict) -> dict:
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["brics", *sys.argv[1:]]),
        "reference": {
            "kind": reference.kind, "path": str(reference.path), "source": reference.source, "split": reference.split,
            "manifest_sha256": reference.manifest_sha256, "fingerprint": reference.fingerprint,
            "n_images": len(reference.files) - unreadable["count"], "unreadable": unreadable,
        },
        "networks": {
            name: {
                "extractor": extractors[name].name, "cache_key": extractors[name].cache_key(),
                "feature": STORED[name][0][0], "resize": extractors[name].resize,
                "weights": [weights.describe(w) for w in extractors[name].weights],
                "stored": [what for _, what in STORED[name] if what == "moments" or not moments_only],
            }
            for name in networks
        },
        "skipped": skipped,
        "prc": {"k": M.PRC_K, "radii": "squared distance to the k-th nearest other reference feature"},
        "covariance": "ddof 1, float64",
        "libraries": libraries,
        "device": str(device),
    }


def unreadable_record(reference: ImageSet, found: dict[str, str]) -> dict:
    return unreadable_report("reference images", len(reference.files), found, reference.repair_hint())


def write_ref_stats(out: Path, arrays: dict[str, np.ndarray], prov: dict) -> Path | None:
    """FILE (atomically), and clean-fid's custom CLIP statistics beside it when CLIP was computed; returns their folder."""
    if out.suffix != ".npz":
        raise ConfigError(f"--out {out}: the statistics file must end in .npz")
    save_npz_atomic(out, {"provenance": np.array(json.dumps(prov)), **arrays})
    if "clip/clip/mu" not in arrays:
        return None
    folder = out.parent / "cleanfid"
    name = f"{out.stem}_clean_{CLEANFID_MODEL}_custom_na".lower()  # clean-fid: f"{name}_{mode}_{model}_{split}_{res}".lower()
    save_npz_atomic(folder / f"{name}.npz", {"mu": arrays["clip/clip/mu"], "sigma": arrays["clip/clip/sigma"]})
    if "clip/clip/features" in arrays:
        save_npz_atomic(folder / f"{name}_kid.npz", {"feats": arrays["clip/clip/features"]})
    return folder
