"""What `brics eval` and `brics nn-search` run: pick the inputs (saying which), check every weight
file before any work, measure, and write the result next to the samples. Under torchrun
(`setup_runtime`) the ranks share the measuring (ranks.py); rank 0 picks the inputs, exports the
reference shards, prints and writes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from brics_cli.core.files import atomic_write_json
from brics_cli.core.progress import Progress
from brics_cli.core.runtime import Runtime, setup_runtime
from brics_cli.errors import BricsError, ConfigError
from brics_cli.eval.image_sets import load_reference, load_samples, recorded_reference
from brics_cli.eval.ranks import failing_together, from_main, gather
from brics_cli.nets import weights
from brics_cli.runs import newest_reconstruction, newest_samples

METRICS = ("fid", "clip-fid", "is", "kid", "prc", "all", "recon")


def say(message: str, rt: Runtime | None = None) -> None:
    """A line on stderr, from rank 0 alone under torchrun."""
    if rt is None or rt.is_main:
        print(message, file=sys.stderr)


def warn_unreadable(what: str, record: dict) -> None:
    """One warning line for images left out as unreadable (they are named in the result)."""
    if record["count"]:
        say(f"warning: {record['count']} unreadable {what} left out (first: {record['files'][0]})")


def run_eval(metric: str, samples: Path | None, ref: str | None, *, split: str, n: int | None, n_ref: int | None, batch: int,
             workers: int, device: str, runs: Path, lpips_net: str) -> tuple[dict[str, Any], Path] | None:
    """`brics eval METRIC`: the result (with its protocol) and the file it was written to, DIR/eval-METRIC.json.
    Under torchrun the ranks share the images; rank 0 writes and returns, the others return None."""
    rt = setup_runtime(device)  # a wrong --device is a usage error here, before anything is looked up
    try:
        with failing_together(rt):
            if metric not in METRICS:
                raise ConfigError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
            if batch < 1 or (n is not None and n < 1) or (n_ref is not None and n_ref < 1):
                raise ConfigError("--batch, --n and --n-ref must be >= 1")
            if metric == "recon":
                result, folder = _recon(rt, samples, lpips_net, batch)
            else:
                result, folder = _generative(rt, metric, samples, ref, split, n, n_ref, batch, workers, runs)
        if not rt.is_main:
            return None
        out = folder / f"eval-{metric}.json"
        atomic_write_json(out, result)
        return result, out
    finally:
        rt.shutdown()


def _pick_samples(rt: Runtime, samples: Path | None, runs: Path, n: int | None, strict: bool = True):
    """The samples folder and its `ImageSet`, found by rank 0 and sent to the others (one set for all)."""
    def pick():
        folder = samples if samples is not None else newest_samples(runs)
        sample_set = load_samples(folder, n, strict)
        if samples is None:
            say(f"samples: {folder} (newest `brics sample` output under {runs}/)")
        return folder, sample_set

    return from_main(rt, pick)


def _reference(rt: Runtime, ref: str, split: str, n_ref: int | None, progress: Progress):
    """The reference `ImageSet`: rank 0 exports the shards into the cache once, the others read its export."""
    reference = from_main(rt, lambda: load_reference(ref, split, n_ref, progress.lazy("export reference")))

    def visible() -> None:  # ranks on another machine need the cache folder on a shared file system
        if not reference.path.is_dir():
            raise BricsError(f"rank {rt.rank} does not see the reference images in {reference.path}: under torchrun every "
                             "rank needs the same --ref and cache folder; point BRICS_CACHE_DIR at a shared file system")

    gather(rt, visible)
    return reference


def _generative(rt, metric, samples, ref, split, n, n_ref, batch, workers, runs):
    from brics_cli.eval.generative import evaluate, expand, required_weights

    names = expand(metric)
    folder, sample_set = _pick_samples(rt, samples, runs, n)
    weights.require_all(required_weights(names))  # stop before any work when a file is missing
    recorded = recorded_reference(sample_set)
    needs_reference = names != ["is"]
    if needs_reference and ref is None and recorded is None:
        raise ConfigError(f"no training data recorded for {folder} (manifest 'data' or the run's config.yaml data.shards); pass --ref SHARDS")
    ref_path = ref if ref is not None else recorded
    is_recorded = recorded is not None and Path(ref_path).resolve() == Path(recorded).resolve()
    with Progress(rt.is_main, transient=True) as progress:
        reference = None
        if needs_reference:
            reference = _reference(rt, ref_path, split, n_ref, progress)
            picked = "" if ref is not None else " (training data recorded for the samples)"
            say(f"reference: {reference.describe()}{picked}", rt)
        result = evaluate(names, sample_set, reference, device=rt.device, batch_size=batch, workers=workers,
                          reference_is_recorded=is_recorded, progress=progress.stage, rt=rt)
    if result is not None:
        for departure in result["protocol"]["departures"]:
            say(f"warning: protocol differs from the paper's: {departure}")
    return result, folder


def _recon(rt, samples, lpips_net, batch):
    from brics_cli.eval.recon_metrics import evaluate_folder

    if lpips_net not in ("alex", "vgg", "none"):
        raise ConfigError(f"--lpips-net must be alex, vgg or none, got '{lpips_net}'")
    folder = samples if samples is not None else newest_reconstruction()
    if samples is None:
        say(f"reconstructions: {folder} (newest folder with inputs/ and recon/)", rt)
    weights.require_all([] if lpips_net == "none" else weights.LPIPS_WEIGHTS[lpips_net])  # before any work
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
                raise ConfigError("--k, --candidates, --batch and --queries must be >= 1")
            folder, sample_set = _pick_samples(rt, samples, runs, queries, strict=False)
            weights.require_all(weights.LPIPS_WEIGHTS["alex"] if metric == "lpips" else ())  # before any work
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
