"""`brics eval fid|clip-fid|is|kid|prc|all`: generated images against reference images, with the protocol.

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
"""

from __future__ import annotations

import importlib.metadata
from typing import Callable

import torch

from brics_cli.core.runtime import Runtime
from brics_cli.errors import ConfigError
from brics_cli.eval import metrics as M
from brics_cli.nets import weights
from brics_cli.eval.features import Extractor, cached_features, production_extractors
from brics_cli.eval.image_sets import ImageSet, cache_root, unreadable_report

GENERATIVE_METRICS = ("fid", "clip-fid", "is", "kid", "prc")
NEEDS = {  # metric -> (extractor, feature)
    "fid": ("inception", "2048"),
    "kid": ("inception", "2048"),
    "is": ("inception", "logits_unbiased"),
    "prc": ("vgg16", "fc2"),
    "clip-fid": ("clip", "clip"),
}
PAPER_SAMPLES = 50_000
MIN_IMAGES = {"fid": 2, "clip-fid": 2, "kid": 2, "is": M.IS_SPLITS, "prc": M.PRC_K + 1}  # per image set
LIBRARIES = ("torch", "torchvision", "torch-fidelity", "clean-fid", "clip-anytorch", "scipy", "numpy", "brics")

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


def _features(image_set: ImageSet, extractor: Extractor, device, batch_size, workers, progress: ProgressFactory | None, label: str,
              unreadable: dict[str, str], rt: Runtime | None):
    advance = progress(label, len(image_set.files)) if progress else None
    feats, cache_hit = cached_features(
        image_set.files, image_set.fingerprint, cache_root() / "features", extractor, lambda: extractor.load(device),
        unreadable, device=device, batch_size=batch_size, workers=workers, progress=advance, rt=rt,
    )
    if cache_hit and advance is not None:
        advance(len(image_set.files))
    return feats


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
) -> dict | None:
    """`{METRIC: VALUE, ..., "protocol": {...}}` for the metrics asked (keys fid, clip_fid, is_mean, is_std,
    kid_mean, kid_std, precision, recall, f1). Under torchrun (`rt`) the ranks share the feature
    extraction; rank 0 alone computes the metrics from the gathered features, the others return None."""
    extractors = extractors or production_extractors()
    needed = {NEEDS[m][0] for m in metric_names}
    needs_reference = any(m != "is" for m in metric_names)
    weights.require_all(required_weights(metric_names, extractors))  # before any work
    for metric in metric_names:
        sets = [("generated", samples)] + ([("reference", reference)] if metric != "is" else [])
        for label, image_set in sets:
            if len(image_set.files) < MIN_IMAGES[metric]:
                raise ConfigError(f"{metric} needs at least {MIN_IMAGES[metric]} {label} images, got {len(image_set.files)}")
    gen, ref = {}, {}
    found: dict[str, dict[str, str]] = {"generated": {}, "reference": {}}  # file name -> "PATH: reason"
    for name in sorted(needed):
        gen[name] = _features(samples, extractors[name], device, batch_size, workers, progress, f"{name} samples",
                              found["generated"], rt)
    unreadable = {"generated": unreadable_report("generated images", len(samples.files), found["generated"], samples.repair_hint())}
    if needs_reference:
        for name in sorted(needed):
            if any(NEEDS[m][0] == name and m != "is" for m in metric_names):
                ref[name] = _features(reference, extractors[name], device, batch_size, workers, progress, f"{name} reference",
                                      found["reference"], rt)
        unreadable["reference"] = unreadable_report("reference images", len(reference.files), found["reference"],
                                                    reference.repair_hint())
    if rt is not None and not rt.is_main:
        return None

    result: dict = {}
    kid_size = None
    for metric in metric_names:
        ex_name, feature = NEEDS[metric]
        g = gen[ex_name][feature]
        if metric in ("fid", "clip-fid"):
            result["fid" if metric == "fid" else "clip_fid"] = M.fid(g, ref[ex_name][feature])
        elif metric == "is":
            result["is_mean"], result["is_std"] = M.inception_score(g)
        elif metric == "kid":
            r = ref[ex_name][feature]
            kid_size = min(M.KID_SUBSET_SIZE, len(g), len(r))
            result["kid_mean"], result["kid_std"] = M.kid(g, r, subset_size=kid_size)
        elif metric == "prc":
            p, r = M.precision_recall(torch.from_numpy(g).to(device), torch.from_numpy(ref[ex_name][feature]).to(device))
            result.update(precision=p, recall=r, f1=M.f1_score(p, r))
    result["protocol"] = protocol(metric_names, samples, reference if needs_reference else None, extractors, device, kid_size,
                                  reference_is_recorded, unreadable)
    return result


def protocol(metric_names, samples: ImageSet, reference: ImageSet | None, extractors, device, kid_size, reference_is_recorded,
             unreadable: dict[str, dict]) -> dict:
    """`unreadable`: {"generated": {"count", "files"}, "reference": ... (when compared)}; n_* count the images measured."""
    used = sorted({NEEDS[m][0] for m in metric_names})
    manifest = samples.manifest or {}
    proto = {
        "metrics": metric_names,
        "n_generated": len(samples.files) - unreadable["generated"]["count"],
        "n_reference": len(reference.files) - unreadable["reference"]["count"] if reference else None,
        "unreadable": unreadable,
        "samples": {
            "path": str(samples.path), "manifest_sha256": samples.manifest_sha256,
            "run": manifest.get("run"), "checkpoint_sha256": manifest.get("checkpoint_sha256"),
        },
        "reference": None if reference is None else {
            "kind": reference.kind, "path": str(reference.path), "source": reference.source, "split": reference.split,
            "manifest_sha256": reference.manifest_sha256, "fingerprint": reference.fingerprint,
            "recorded_for_samples": reference_is_recorded,
        },
        "feature_extractors": {m: f"{extractors[NEEDS[m][0]].name} / {NEEDS[m][1]}" for m in metric_names},
        "resize": {extractors[e].name: extractors[e].resize for e in used},
        "weights": [weights.describe(w) for w in required_weights(metric_names, extractors)],
        "libraries": library_versions(),
        "device": str(device),
    }
    if "kid" in metric_names:
        proto["kid"] = {"subsets": M.KID_SUBSETS, "subset_size": kid_size, "kernel": "(x.y/D + 1)^3", "seed": M.SEED}
    if "is" in metric_names:
        proto["is"] = {"splits": M.IS_SPLITS, "seed": M.SEED}
    if "prc" in metric_names:
        proto["prc"] = {"k": M.PRC_K, "feature": "vgg16 fc2 (pre-ReLU)"}
    proto["departures"] = departures(proto)
    return proto


def departures(proto: dict) -> list[str]:
    """How this evaluation differs from the paper's protocol (empty when it does not)."""
    out = []
    if proto["n_generated"] < PAPER_SAMPLES:
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


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """(metric, formatted value) rows for a table, in the paper's order."""
    rows = []
    for key, label in (("fid", "FID"), ("clip_fid", "CLIP-FID"), ("is_mean", "IS"), ("kid_mean", "KID"),
                       ("precision", "Precision"), ("recall", "Recall"), ("f1", "F1")):
        if key in result:
            value = f"{result[key]:.4g}"
            std_key = key.replace("_mean", "_std")
            if std_key != key and std_key in result:
                value += f" +- {result[std_key]:.2g}"
            rows.append((label, value))
    return rows

