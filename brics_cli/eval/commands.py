"""What `brics eval` and `brics nn-search` run: pick the inputs (saying which), check every weight
file before any work, measure, and write the result next to the samples (`brics eval stats`: the
reference statistics to --out). Under torchrun
(`setup_runtime`) the ranks share the measuring (ranks.py); rank 0 picks the inputs, exports the
reference shards, prints and writes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from brics_cli.core.files import atomic_write_json
from brics_cli.core.progress import Progress
from brics_cli.core.runtime import Runtime, setup_runtime
from brics_cli.errors import BricsError, ConfigError, Missing, PrerequisitesMissing
from brics_cli.eval.image_sets import load_reference, load_samples, recorded_reference
from brics_cli.eval.ranks import failing_together, from_main, gather
from brics_cli.nets import weights
from brics_cli.registry import closest
from brics_cli.runs import newest_reconstruction, newest_samples

METRICS = ("fid", "clip-fid", "fd-dinov2", "is", "kid", "prc", "all", "recon", "stats")


def say(message: str, rt: Runtime | None = None) -> None:
    """A line on stderr, from rank 0 alone under torchrun."""
    if rt is None or rt.is_main:
        print(message, file=sys.stderr)


def warn_unreadable(what: str, record: dict) -> None:
    """One warning line for images left out as unreadable (they are named in the result)."""
    if record["count"]:
        say(f"warning: {record['count']} unreadable {what} left out (first: {record['files'][0]})")


def run_eval(metric: str, samples: Path | None, ref: str | None, *, split: str, n: int | None, n_ref: int | None, batch: int,
             workers: int, device: str, runs: Path, lpips_net: str, ref_stats: Path | None = None, seed_sets: int | None = None,
             out: Path | None = None, networks: list[str] | None = None,
             moments_only: bool = False) -> tuple[dict[str, Any], Path] | None:
    """`brics eval METRIC`: the result (with its protocol) and the file it was written to, DIR/eval-METRIC.json
    (`stats`: the statistics file --out). Under torchrun the ranks share the images; rank 0 writes and returns,
    the others return None."""
    rt = setup_runtime(device)  # a wrong --device is a usage error here, before anything is looked up
    try:
        with failing_together(rt):
            _check_flags(metric, samples, ref, n, n_ref, batch, ref_stats, seed_sets, out, networks, moments_only)
            if metric == "stats":
                return _stats(rt, ref, split, n_ref, out, networks, moments_only, batch, workers)
            if metric == "recon":
                result, folder = _recon(rt, samples, lpips_net, batch, runs)
            else:
                result, folder = _generative(rt, metric, samples, ref, split, n, n_ref, batch, workers, runs, ref_stats, seed_sets)
        if not rt.is_main:
            return None
        written = folder / f"eval-{metric}.json"
        atomic_write_json(written, result)
        return result, written
    finally:
        rt.shutdown()


def _check_flags(metric, samples, ref, n, n_ref, batch, ref_stats, seed_sets, out, networks, moments_only) -> None:
    """Usage errors (exit 2) before anything is read."""
    if metric not in METRICS:
        hint = closest(metric, list(METRICS))
        raise ConfigError(f"unknown metric '{metric}'" + (f"; did you mean '{hint}'?" if hint else "")
                          + f" (choose one of {', '.join(METRICS)})")
    if batch < 1 or (n is not None and n < 1) or (n_ref is not None and n_ref < 1):
        raise ConfigError("--batch, --limit and --ref-limit must be >= 1")
    if ref is not None and ref_stats is not None:
        raise ConfigError("--ref and --ref-stats are alternatives: the reference images, or their statistics")
    if ref_stats is not None and n_ref is not None:
        raise ConfigError("--ref-limit applies to reference images; statistics from --ref-stats hold the images they were made of")
    stats_only = [flag for flag, given in (("--out", out is not None), ("--networks", networks is not None),
                                           ("--moments-only", moments_only)) if given]
    if metric != "stats" and stats_only:
        raise ConfigError(f"{', '.join(stats_only)}: only for `brics eval stats`")
    if metric in ("stats", "recon") and seed_sets is not None:
        raise ConfigError(f"--seed-sets splits generated images: not for `brics eval {metric}`")
    if metric == "stats" and (samples is not None or ref_stats is not None or n is not None):
        raise ConfigError("`brics eval stats` reads only the reference: --ref SHARDS_OR_FOLDER --out FILE.npz (no --samples, --limit, --ref-stats)")
    if metric == "stats" and (ref is None or out is None):
        raise ConfigError("`brics eval stats` needs --ref SHARDS_OR_FOLDER and --out FILE.npz")
    if metric == "stats" and out.suffix != ".npz":
        raise ConfigError(f"--out {out}: the statistics file must end in .npz")


def _pick_samples(rt: Runtime, samples: Path | None, runs: Path, n: int | None, strict: bool = True):
    """The samples folder and its `ImageSet`, found by rank 0 and sent to the others (one set for all)."""
    def pick():
        folder, why = (samples, "") if samples is not None else newest_samples(runs)
        sample_set = load_samples(folder, n, strict)
        if samples is None:
            say(f"samples: {folder} (the newest `brics sample` output, {why}; --samples DIR to choose)")
        return folder, sample_set

    return from_main(rt, pick)


def _samples_and_weights(rt: Runtime, command: str, samples: Path | None, runs: Path, n: int | None, needed: list[str],
                         strict: bool = True):
    """The samples, when the weight files the metric needs are there too: a missing samples folder
    and missing weights are named together (exit 2), so nobody samples 50k images to then learn
    that a network file is absent."""
    absent = weights.missing(needed)
    try:
        picked = _pick_samples(rt, samples, runs, n, strict)
    except BricsError as exc:
        if absent and exc.exit_code == 2:
            raise PrerequisitesMissing(command, [Missing("samples", str(exc)), *absent]) from None
        raise
    return picked  # weights alone missing: the caller's `require_all` names them in one line


def _reference(rt: Runtime, ref: str, split: str, n_ref: int | None, progress: Progress):
    """The reference `ImageSet`: rank 0 exports the shards into the cache once, the others read its export."""
    reference = from_main(rt, lambda: load_reference(ref, split, n_ref, progress.lazy("export reference")))

    def visible() -> None:  # ranks on another machine need the cache folder on a shared file system
        if not reference.path.is_dir():
            raise BricsError(f"rank {rt.rank} does not see the reference images in {reference.path}: under torchrun every "
                             "rank needs the same --ref and cache folder; point BRICS_CACHE_DIR at a shared file system")

    gather(rt, visible)
    return reference


def _generative(rt, metric, samples, ref, split, n, n_ref, batch, workers, runs, ref_stats_path, seed_sets):
    from brics_cli.eval.generative import check_sample_count, evaluate, expand, required_weights
    from brics_cli.eval.ref_stats import load_ref_stats

    names = expand(metric)
    folder, sample_set = _samples_and_weights(rt, f"eval {metric}", samples, runs, n, required_weights(names))
    check_sample_count(names, len(sample_set.files), seed_sets)
    weights.require_all(required_weights(names))  # present: now also the published sha256, before any work
    needs_reference = names != ["is"]
    stats = load_ref_stats(ref_stats_path) if ref_stats_path is not None and needs_reference else None
    recorded = recorded_reference(sample_set)
    if needs_reference and ref is None and stats is None and recorded is None:
        raise ConfigError(f"no training data recorded for {folder} (manifest 'data' or the run's config.yaml data.shards); "
                          "pass --ref SHARDS or --ref-stats FILE")
    ref_path = ref if ref is not None else (stats.source() if stats is not None else recorded)
    is_recorded = recorded is not None and Path(ref_path).resolve() == Path(recorded).resolve()
    with Progress(rt.is_main, transient=True) as progress:
        reference = None
        if stats is not None:
            say(f"reference: statistics {ref_stats_path} of {stats.n_images} images from {stats.source()}", rt)
        elif needs_reference:
            reference = _reference(rt, ref_path, split, n_ref, progress)
            picked = "" if ref is not None else " (training data recorded for the samples)"
            say(f"reference: {reference.describe()}{picked}", rt)
        result = evaluate(names, sample_set, reference, device=rt.device, batch_size=batch, workers=workers,
                          reference_is_recorded=is_recorded, progress=progress.stage, rt=rt, ref_stats=stats, seed_sets=seed_sets)
    if result is not None:
        for departure in result["protocol"]["departures"]:
            say(f"warning: protocol differs from the paper's: {departure}")
    return result, folder


def _stats(rt, ref, split, n_ref, out, networks, moments_only, batch, workers):
    """`brics eval stats`: the reference's statistics written to `out` (ref_stats.py); (summary, out) on rank 0."""
    from brics_cli.eval import ref_stats as RS
    from brics_cli.eval.features import production_extractors
    from brics_cli.eval.generative import library_versions, set_features

    extractors = production_extractors()
    chosen, skipped = RS.choose_networks(networks, extractors)
    weights.require_all([w for name in chosen for w in extractors[name].weights])  # asked for: a missing file stops here
    for name, why in skipped.items():
        say(f"note: {name} statistics skipped: {why}", rt)
    found: dict[str, str] = {}
    with Progress(rt.is_main, transient=True) as progress:
        reference = _reference(rt, ref, split, n_ref, progress)
        say(f"reference: {reference.describe()}", rt)
        feats = {name: set_features(reference, extractors[name], rt.device, batch, workers, progress.stage, f"{name} reference",
                                    found, rt) for name in chosen}
    unreadable = RS.unreadable_record(reference, found)
    if not rt.is_main:
        return None
    arrays = {}
    for name in chosen:
        arrays.update(RS.reduce_features(name, feats[name], moments_only, rt.device))
    provenance = RS.provenance(reference, chosen, skipped, extractors, unreadable, moments_only, rt.device, library_versions())
    cleanfid = RS.write_ref_stats(out, arrays, provenance)
    warn_unreadable("reference images", unreadable)
    summary = {"stats": str(out), "cleanfid": str(cleanfid) if cleanfid else None,
               "arrays": {key: list(a.shape) for key, a in arrays.items()}, "provenance": provenance}
    return summary, out


def _recon(rt, samples, lpips_net, batch, runs):
    from brics_cli.eval.recon_metrics import evaluate_folder

    if lpips_net not in ("alex", "vgg", "none"):
        raise ConfigError(f"--lpips-net must be alex, vgg or none, got '{lpips_net}'")
    folder, why = (samples, "") if samples is not None else newest_reconstruction(runs)
    if samples is None:
        say(f"reconstructions: {folder} (the newest `brics reconstruct` output, {why}; --samples DIR to choose)", rt)
    try:
        weights.require_all([] if lpips_net == "none" else weights.LPIPS_WEIGHTS[lpips_net])  # before any work
    except weights.WeightsMissing as exc:  # reconstruct goes on without LPIPS; here the user chooses
        raise weights.WeightsMissing(f"{exc}; or pass --lpips-net none for PSNR and SSIM only") from None
    with Progress(rt.is_main, transient=True) as progress:
        result = evaluate_folder(folder, lpips_net, rt.device, batch, progress=progress.stage, rt=rt)
    if rt.is_main:
        warn_unreadable("image pairs", result["protocol"]["unreadable"])
    return result, folder


def run_nn_search(samples: Path | None, ref: str | None, *, split: str, k: int, queries: int, metric: str, candidates: int,
                  exact: bool, grid_rows: int, out: Path | None, batch: int, device: str,
                  runs: Path) -> tuple[dict[str, Any], Path] | None:
    """`brics nn-search`: the report (also written to OUT/nn.json, with OUT/nn-grid.png) and OUT.
    Under torchrun the ranks share the search; rank 0 writes and returns, the others return None."""
    from brics_cli.eval.nn_search import find_neighbours

    rt = setup_runtime(device)  # a wrong --device is a usage error here, before anything is looked up
    try:
        with failing_together(rt):
            if metric not in ("lpips", "l2"):
                raise ConfigError(f"--metric must be lpips or l2, got '{metric}'")
            if k < 1 or candidates < 1 or batch < 1 or queries < 1:
                raise ConfigError("--k, --candidates, --batch and --limit must be >= 1")
            needed = list(weights.LPIPS_WEIGHTS["alex"]) if metric == "lpips" else []
            folder, sample_set = _samples_and_weights(rt, "nn-search", samples, runs, queries, needed, strict=False)
            weights.require_all(needed)  # present: now also the published sha256, before any work
            recorded = recorded_reference(sample_set)
            if ref is None and recorded is None:
                raise ConfigError(f"no training data recorded for {folder}; pass --ref SHARDS")
            with Progress(rt.is_main, transient=True) as progress:
                reference = _reference(rt, ref or recorded, split, None, progress)
                say(f"reference: {reference.describe()}", rt)
                found = find_neighbours(sample_set, reference, metric, k=k, candidates=candidates, exact=exact, batch=batch,
                                        device=rt.device, grid_rows=grid_rows, progress=progress.stage, rt=rt)
        if found is None:  # not rank 0
            return None
        report, sheet = found
        for what, record in report["search"]["unreadable"].items():
            warn_unreadable(what if what == "samples" else "reference images", record)
        out = out or folder
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "nn.json", report)
        sheet.save(out / "nn-grid.png")
        return report, out
    finally:
        rt.shutdown()
