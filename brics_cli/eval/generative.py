"""`brics eval fid|clip-fid|fd-dinov2|is|kid|prc|all`: generated images against a reference, with the protocol.

Each metric needs one feature of one extractor (features.py); `all` runs each extractor once per
image set and derives every metric from those features (FID, KID and IS share one Inception pass).
Reference features are cached by the reference's fingerprint (shard manifest hash or folder listing)
and the extractor's weight sha256, so evaluating several sample sets against one dataset extracts
the reference once. Unreadable files are left out and named ("unreadable" in the protocol); past
`MAX_UNREADABLE` of a set no metric is reported (the generated images are checked before the
reference is read). The result carries its protocol: what was compared, how many, which weights
(sha256), libraries, device, and every departure from the paper's protocol (Sec. 4, Suppl. F:
50k generated images against the training set). Under torchrun the ranks share the feature
extraction (ranks.py) and rank 0 computes the metrics: the numbers of one process.

The reference is its images or their statistics written once by `brics eval stats` (ref_stats.py,
`--ref-stats`): Frechet distances then use the stored mean and covariance, KID and precision/recall the
stored features -- the same numbers as from the images. `--seed-sets K` measures K disjoint sets of the
samples (in index order) against one reference and reports mean, std, min (and max) over them, as EDM2.
"""

from __future__ import annotations

import importlib.metadata
from typing import Callable

import numpy as np
import torch

from brics_cli.core.runtime import Runtime
from brics_cli.errors import ConfigError
from brics_cli.eval import metrics as M
from brics_cli.nets import weights
from brics_cli.eval.features import Extractor, cached_features, production_extractors
from brics_cli.eval.image_sets import ImageSet, cache_root, unreadable_report

GENERATIVE_METRICS = ("fid", "clip-fid", "fd-dinov2", "is", "kid", "prc")
NEEDS = {  # metric -> (extractor, feature)
    "fid": ("inception", "2048"),
    "kid": ("inception", "2048"),
    "is": ("inception", "logits_unbiased"),
    "prc": ("vgg16", "fc2"),
    "clip-fid": ("clip", "clip"),
    "fd-dinov2": ("dinov2", "dinov2"),
}
FRECHET_KEYS = {"fid": "fid", "clip-fid": "clip_fid", "fd-dinov2": "fd_dinov2"}  # metric -> result key
REFERENCE_NEEDS = {  # metric -> what it needs of the reference (for --ref-stats): "moments" (mu, sigma) or "features"
    "fid": "moments", "clip-fid": "moments", "fd-dinov2": "moments", "kid": "features", "prc": "features",
}
PAPER_SAMPLES = 50_000
MIN_IMAGES = {"fid": 2, "clip-fid": 2, "fd-dinov2": 2, "kid": 2, "is": M.IS_SPLITS, "prc": M.PRC_K + 1}  # per image set
LIBRARIES = ("torch", "torchvision", "torch-fidelity", "clean-fid", "clip-anytorch", "scipy", "numpy", "brics")
RESULT_KEYS = ("fid", "clip_fid", "fd_dinov2", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall", "f1")

ProgressFactory = Callable[[str, int], Callable[[int], None]]


def expand(metric: str) -> list[str]:
    return list(GENERATIVE_METRICS) if metric == "all" else [metric]


def required_weights(metric_names: list[str], extractors: dict[str, Extractor] | None = None) -> list[str]:
    extractors = extractors or production_extractors()
    names = []
    for metric in metric_names:
        for w in extractors[NEEDS[metric][0]].weights:
            if w not in names:
                names.append(w)
    return names


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def set_features(image_set: ImageSet, extractor: Extractor, device, batch_size, workers, progress: ProgressFactory | None,
                 label: str, unreadable: dict[str, str], rt: Runtime | None) -> dict[str, np.ndarray]:
    """The extractor's features of every readable image of the set, through the shared feature cache."""
    advance = progress(label, len(image_set.files)) if progress else None
    feats, cache_hit = cached_features(
        image_set.files, image_set.fingerprint, cache_root() / "features", extractor, lambda: extractor.load(device),
        unreadable, device=device, batch_size=batch_size, workers=workers, progress=advance, rt=rt,
    )
    if cache_hit and advance is not None:
        advance(len(image_set.files))
    return feats


class ReferenceSide:
    """What the metrics compare with: the reference's features, or a stats file's arrays (`--ref-stats`).
    Moments and k-NN radii are computed once, however many seed sets use them."""

    def __init__(self, features: dict[str, dict[str, np.ndarray]] | None = None, stats=None, device=None):
        self.feats, self.stats, self.device, self._memo = features or {}, stats, device, {}

    def moments(self, network: str, feature: str):
        if self.stats is not None:
            return self.stats.moments(network, feature)
        if (network, feature, "moments") not in self._memo:
            self._memo[network, feature, "moments"] = M.feature_statistics(self.feats[network][feature])
        return self._memo[network, feature, "moments"]

    def features(self, network: str, feature: str) -> np.ndarray:
        return self.stats.arrays[f"{network}/{feature}/features"] if self.stats is not None else self.feats[network][feature]

    def radii(self, network: str, feature: str) -> torch.Tensor:
        if (network, feature, "radii") not in self._memo:
            key = f"{network}/{feature}/radii"
            if self.stats is not None and key in self.stats.arrays:
                radii = torch.from_numpy(self.stats.arrays[key])
            else:
                radii = M.knn_radii(torch.from_numpy(self.features(network, feature)).to(self.device), M.PRC_K)
            self._memo[network, feature, "radii"] = radii.to(self.device)
        return self._memo[network, feature, "radii"]


def compute_metrics(metric_names: list[str], gen: dict[str, dict[str, np.ndarray]], ref: ReferenceSide, device) -> tuple[dict, int | None]:
    """({result key: value}, KID subset size or None) of generated features against the reference side."""
    result: dict = {}
    kid_size = None
    for metric in metric_names:
        ex_name, feature = NEEDS[metric]
        g = gen[ex_name][feature]
        if metric in FRECHET_KEYS:
            result[FRECHET_KEYS[metric]] = M.fid_to_statistics(g, *ref.moments(ex_name, feature))
        elif metric == "is":
            result["is_mean"], result["is_std"] = M.inception_score(g)
        elif metric == "kid":
            r = ref.features(ex_name, feature)
            kid_size = min(M.KID_SUBSET_SIZE, len(g), len(r))
            result["kid_mean"], result["kid_std"] = M.kid(g, r, subset_size=kid_size)
        elif metric == "prc":
            real = torch.from_numpy(ref.features(ex_name, feature)).to(device)
            p, r = M.precision_recall(torch.from_numpy(g).to(device), real, real_radii=ref.radii(ex_name, feature))
            result.update(precision=p, recall=r, f1=M.f1_score(p, r))
    return result, kid_size


def seed_set_ranges(n_files: int, k: int) -> list[range]:
    """K disjoint, equal sets of sample indices in index order (EDM2's seed sets); the n mod K last are left out."""
    size = n_files // k
    return [range(j * size, (j + 1) * size) for j in range(k)]


def summarise_seed_sets(per_set: list[dict]) -> dict:
    """{"per_set": {key: [v_1..v_K]}, "mean", "std" (ddof 1), "min", "max": {key: value}} over the sets' results."""
    keys = [k for k in RESULT_KEYS if k in per_set[0]]
    values = {k: [r[k] for r in per_set] for k in keys}
    return {
        "per_set": values,
        "mean": {k: float(np.mean(v)) for k, v in values.items()},
        "std": {k: float(np.std(v, ddof=1)) for k, v in values.items()},
        "min": {k: float(np.min(v)) for k, v in values.items()},
        "max": {k: float(np.max(v)) for k, v in values.items()},
    }


def check_sample_count(metric_names: list[str], n_samples: int, seed_sets: int | None) -> None:
    """Usage errors of the generated set's size (per seed set with `seed_sets`), before any work."""
    per_set = n_samples // seed_sets if seed_sets else n_samples
    if seed_sets is not None and (seed_sets < 2 or per_set < 2):
        raise ConfigError(f"--seed-sets {seed_sets}: needs K >= 2 sets of at least 2 images each; there are {n_samples} generated images")
    for metric in metric_names:
        label = "generated images per seed set" if seed_sets else "generated images"
        if per_set < MIN_IMAGES[metric]:
            raise ConfigError(f"{metric} needs at least {MIN_IMAGES[metric]} {label}, got {per_set}")


def _check_sizes(metric_names, samples: ImageSet, n_reference: int | None, seed_sets: int | None) -> None:
    check_sample_count(metric_names, len(samples.files), seed_sets)
    for metric in metric_names:
        if metric != "is" and n_reference is not None and n_reference < MIN_IMAGES[metric]:
            raise ConfigError(f"{metric} needs at least {MIN_IMAGES[metric]} reference images, got {n_reference}")


def evaluate(
    metric_names: list[str],
    samples: ImageSet,
    reference: ImageSet | None,
    *,
    device: torch.device,
    extractors: dict[str, Extractor] | None = None,
    batch_size: int = 64,
    workers: int = 0,
    reference_is_recorded: bool = True,
    progress: ProgressFactory | None = None,
    rt: Runtime | None = None,
    ref_stats=None,
    seed_sets: int | None = None,
) -> dict | None:
    """`{METRIC: VALUE, ..., "protocol": {...}}` for the metrics asked (keys in RESULT_KEYS). The reference is
    `reference` (images) or `ref_stats` (a `ref_stats.RefStats`). With `seed_sets` K the samples are split into
    K equal sets in index order, each measured against the whole reference: every key is then the mean over the
    sets, and "seed_sets" holds the per-set values, mean, std, min and max. Under torchrun (`rt`) the ranks
    share the feature extraction; rank 0 alone computes the metrics, the others return None."""
    extractors = extractors or production_extractors()
    needed = {NEEDS[m][0] for m in metric_names}
    compared = [m for m in metric_names if m != "is"]
    weights.require_all(required_weights(metric_names, extractors))  # before any work
    n_reference = ref_stats.n_images if ref_stats is not None else (len(reference.files) if compared else None)
    _check_sizes(metric_names, samples, n_reference, seed_sets)
    if ref_stats is not None:
        ref_stats.check([(*NEEDS[m], REFERENCE_NEEDS[m]) for m in compared], extractors)
    gen, ref = {}, {}
    found: dict[str, dict[str, str]] = {"generated": {}, "reference": {}}  # file name -> "PATH: reason"
    for name in sorted(needed):
        gen[name] = set_features(samples, extractors[name], device, batch_size, workers, progress, f"{name} samples",
                                 found["generated"], rt)
    unreadable = {"generated": unreadable_report("generated images", len(samples.files), found["generated"], samples.repair_hint())}
    if compared and ref_stats is None:
        for name in sorted({NEEDS[m][0] for m in compared}):
            ref[name] = set_features(reference, extractors[name], device, batch_size, workers, progress, f"{name} reference",
                                     found["reference"], rt)
        unreadable["reference"] = unreadable_report("reference images", len(reference.files), found["reference"],
                                                    reference.repair_hint())
    if rt is not None and not rt.is_main:
        return None

    side = ReferenceSide(ref, ref_stats, device)
    if seed_sets is None:
        result, kid_size = compute_metrics(metric_names, gen, side, device)
        sets = None
    else:
        ranges = seed_set_ranges(len(samples.files), seed_sets)
        per_set = []
        for rows in _rows_of_sets(samples, found["generated"], ranges):
            part = {ex: {f: v[rows] for f, v in feats.items()} for ex, feats in gen.items()}
            values, kid_size = compute_metrics(metric_names, part, side, device)
            per_set.append(values)
        sets = summarise_seed_sets(per_set)
        sets.update(k=seed_sets, set_size=len(ranges[0]), left_out=len(samples.files) - seed_sets * len(ranges[0]),
                    sets=[[r.start, r.stop] for r in ranges])
        result = dict(sets["mean"])
        result["seed_sets"] = sets
    used_reference = None if not compared else (ref_stats.record() if ref_stats is not None else reference)
    result["protocol"] = protocol(metric_names, samples, used_reference, extractors, device, kid_size, reference_is_recorded,
                                  unreadable, n_reference=n_reference, seed_sets=sets)
    return result


def _rows_of_sets(samples: ImageSet, unreadable: dict[str, str], ranges: list[range]) -> list[np.ndarray]:
    """Feature rows of each set's files: unreadable files have no row, so rows are counted over readable ones."""
    readable = np.array([f.name not in unreadable for f in samples.files])
    row_of = np.cumsum(readable) - 1
    return [row_of[[i for i in r if readable[i]]] for r in ranges]


def protocol(metric_names, samples: ImageSet, reference, extractors, device, kid_size, reference_is_recorded,
             unreadable: dict[str, dict], n_reference: int | None = None, seed_sets: dict | None = None) -> dict:
    """`reference`: the `ImageSet` compared with, a stats file's `RefStats.record()`, or None (IS alone).
    `unreadable`: {"generated": {"count", "files"}, "reference": ... (when images were compared)}; n_* count the
    images measured."""
    used = sorted({NEEDS[m][0] for m in metric_names})
    manifest = samples.manifest or {}
    if isinstance(reference, ImageSet):
        n_reference = len(reference.files) - unreadable["reference"]["count"]
        reference = {
            "kind": reference.kind, "path": str(reference.path), "source": reference.source, "split": reference.split,
            "manifest_sha256": reference.manifest_sha256, "fingerprint": reference.fingerprint,
        }
    proto = {
        "metrics": metric_names,
        "n_generated": len(samples.files) - unreadable["generated"]["count"],
        "n_reference": n_reference if reference is not None else None,
        "unreadable": unreadable,
        "samples": {
            "path": str(samples.path), "manifest_sha256": samples.manifest_sha256,
            "run": manifest.get("run"), "checkpoint_sha256": manifest.get("checkpoint_sha256"),
        },
        "reference": None if reference is None else {**reference, "recorded_for_samples": reference_is_recorded},
        "feature_extractors": {m: f"{extractors[NEEDS[m][0]].name} / {NEEDS[m][1]}" for m in metric_names},
        "resize": {extractors[e].name: extractors[e].resize for e in used},
        "weights": [weights.describe(w) for w in required_weights(metric_names, extractors)],
        "libraries": library_versions(),
        "device": str(device),
    }
    if seed_sets is not None:
        proto["seed_sets"] = {k: seed_sets[k] for k in ("k", "set_size", "left_out", "sets")}
        proto["seed_sets"]["std"] = "sample standard deviation (ddof 1) over the sets; every set against the whole reference"
    if "kid" in metric_names:
        proto["kid"] = {"subsets": M.KID_SUBSETS, "subset_size": kid_size, "kernel": "(x.y/D + 1)^3", "seed": M.SEED}
    if "is" in metric_names:
        proto["is"] = {"splits": M.IS_SPLITS, "seed": M.SEED}
    if "prc" in metric_names:
        proto["prc"] = {"k": M.PRC_K, "feature": "vgg16 fc2 (pre-ReLU)"}
    if "fd-dinov2" in metric_names:
        proto["fd_dinov2"] = {"network": "DINOv2 ViT-L/14 (dinov2_vitl14)", "feature": "class token after the final LayerNorm",
                              "as": "EDM2 calculate_metrics.py DINOv2Detector (resize_mode 'torch'); dgm-eval resizes with PIL bicubic"}
    proto["departures"] = departures(proto)
    return proto


def departures(proto: dict) -> list[str]:
    """How this evaluation differs from the paper's protocol (empty when it does not)."""
    out = []
    sets = proto.get("seed_sets")
    if sets is not None and sets["set_size"] < PAPER_SAMPLES:
        out.append(f"{sets['set_size']} generated images per seed set, the paper used {PAPER_SAMPLES}")
    elif sets is None and proto["n_generated"] < PAPER_SAMPLES:
        out.append(f"{proto['n_generated']} generated images, the paper used {PAPER_SAMPLES}")
    ref = proto["reference"]
    if ref is not None:
        if not ref["recorded_for_samples"]:
            out.append("the reference is not the training data recorded for these samples")
        if ref["split"] not in (None, "train"):
            out.append(f"the reference is the '{ref['split']}' split, the paper compared with the training images")
    kid = proto.get("kid")
    if kid and kid["subset_size"] < M.KID_SUBSET_SIZE:
        out.append(f"KID subsets of {kid['subset_size']} images (torch-fidelity's default is {M.KID_SUBSET_SIZE})")
    for label, record in proto["unreadable"].items():
        if record["count"]:
            out.append(f"{record['count']} unreadable {label} images left out (first: {record['files'][0]})")
    unverified = [w["file"] for w in proto["weights"] if w.get("verified") is False]
    if unverified:
        out.append(f"weight files that are not the published ones: {', '.join(unverified)}")
    return out


LABELS = (("fid", "FID"), ("clip_fid", "CLIP-FID"), ("fd_dinov2", "FD-DINOv2"), ("is_mean", "IS"), ("is_std", "IS std"),
          ("kid_mean", "KID"), ("kid_std", "KID std"), ("precision", "Precision"), ("recall", "Recall"), ("f1", "F1"))


def seed_set_rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(metric, mean, std, min, per-set values) rows for a table of a `--seed-sets` result."""
    sets = result["seed_sets"]
    return [(label, f"{sets['mean'][key]:.4g}", f"{sets['std'][key]:.2g}", f"{sets['min'][key]:.4g}",
             " ".join(f"{v:.4g}" for v in sets["per_set"][key])) for key, label in LABELS if key in sets["mean"]]


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """(metric, formatted value) rows for a table, in the paper's order."""
    rows = []
    for key, label in (("fid", "FID"), ("clip_fid", "CLIP-FID"), ("fd_dinov2", "FD-DINOv2"), ("is_mean", "IS"), ("kid_mean", "KID"),
                       ("precision", "Precision"), ("recall", "Recall"), ("f1", "F1")):
        if key in result:
            value = f"{result[key]:.4g}"
            std_key = key.replace("_mean", "_std")
            if std_key != key and std_key in result:
                value += f" +- {result[std_key]:.2g}"
            rows.append((label, value))
    return rows

