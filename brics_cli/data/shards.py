"""Deterministic, resumable WebDataset shard writing (`brics shard`).

A run is planned before any work: the source lists its items in a fixed order, the split assigns
each to train or val, and shard s of a split holds items [s * shard_size, (s + 1) * shard_size) of
that split's list. A shard's bytes therefore depend only on its items and the options -- not on
the number of workers, nor on which shards were written by an earlier, interrupted run.

Each shard is written atomically (`core.files.atomic_write_bytes`), then a done-marker (with its
sha256, sample count and failures) is written; a rerun skips shards whose marker and tar agree.
The options of a run are stored in `.brics-shard/options.json`; a rerun with other options is
refused unless `--overwrite`. Tar members have a fixed mtime, owner and mode, so identical input
gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from brics_cli.core.files import atomic_write_bytes, atomic_write_json, remove_stale_temporaries, sha256_bytes, sha256_file
from brics_cli.core.locks import FolderLock
from brics_cli.errors import BricsError, ConfigError

STATE_DIR = ".brics-shard"
EXAMPLES_PER_CATEGORY = 5


@dataclass(frozen=True)
class ShardOptions:
    resolution: int = 256
    resize_filter: str = "lanczos"
    format: str = "png"
    quality: int = 95
    shard_size: int = 1000
    seed: int = 0
    small: str = "skip"
    extra: tuple[tuple[str, Any], ...] = ()  # source-specific options, recorded in the manifest

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra"] = dict(self.extra)
        return d


@dataclass
class ShardResult:
    """What one shard produced: written samples and skipped inputs by category."""

    name: str
    count: int = 0
    sha256: str = ""
    failures: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, category: str, detail: str) -> None:
        self.failures[category] = self.failures.get(category, 0) + 1
        examples = self.examples.setdefault(category, [])
        if len(examples) < EXAMPLES_PER_CATEGORY:
            examples.append(detail)


def item_rng(seed: int, item_id: str) -> random.Random:
    """A per-item random stream: the same item gets the same crop whatever worker handles it."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def write_tar_atomic(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> str:
    """Write a reproducible tar of samples (key, {ext: bytes}); returns its sha256."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits on them)")
            for ext in sorted(files):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(files[ext])
                info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
                tar.addfile(info, io.BytesIO(files[ext]))
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker process needs to write one shard (picklable)."""

    out: str
    name: str
    items: tuple[tuple[str, Any], ...]  # (sample key, source item)
    process: Callable[[Any, ShardOptions, random.Random], dict[str, bytes]]
    options: ShardOptions


def run_job(job: ShardJob) -> ShardResult:
    """Process the job's items (skipping bad ones) and write its shard. Runs in a worker process."""
    from brics_cli.core.images import ImageSkip

    result = ShardResult(job.name)
    samples = []
    for key, item in job.items:
        try:
            samples.append((key, job.process(item, job.options, item_rng(job.options.seed, item_id(item)))))
        except ImageSkip as skip:
            result.skip(skip.category, f"{item_id(item)}: {skip.detail}")
    result.count = len(samples)
    result.sha256 = write_tar_atomic(Path(job.out) / job.name, samples)
    atomic_write_json(Path(job.out) / STATE_DIR / f"{job.name}.done.json", asdict(result))
    return result


def item_id(item: Any) -> str:
    return str(getattr(item, "id", item))


def plan_jobs(out: Path, splits: dict[str, Sequence[Any]], process, options: ShardOptions) -> list[ShardJob]:
    jobs = []
    for split, items in splits.items():
        for s, start in enumerate(range(0, len(items), options.shard_size)):
            # Keys: split-local index, zero-padded (dot-free, sorted like the source order).
            chunk = tuple((f"{i:08d}", items[i]) for i in range(start, min(start + options.shard_size, len(items))))
            jobs.append(ShardJob(str(out), f"{split}-{s:06d}.tar", chunk, process, options))
    return jobs


def _done(out: Path, name: str) -> ShardResult | None:
    marker = out / STATE_DIR / f"{name}.done.json"
    tar = out / name
    if not (marker.is_file() and tar.is_file()):
        return None
    try:
        result = ShardResult(**json.loads(marker.read_text()))
    except (ValueError, TypeError):
        return None
    return result if sha256_file(tar) == result.sha256 else None


def prepare_output(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> None:
    """Create `out`, or check that an earlier run there used the same source and options."""
    state = out / STATE_DIR
    options_file = state / "options.json"
    if overwrite and out.exists():
        for path in list(out.glob("*.tar")) + [out / "manifest.json"]:
            path.unlink(missing_ok=True)
        for path in state.glob("*") if state.exists() else []:
            path.unlink()
    if options_file.is_file():
        previous = json.loads(options_file.read_text())
        if previous != fingerprint:
            changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
            raise ConfigError(
                f"{out} holds shards made with other settings ({', '.join(changed)} differ); "
                f"pass --overwrite to replace them or choose another --out"
            )
    elif out.exists() and any(out.glob("*.tar")):
        raise ConfigError(f"{out} already holds .tar files not written by `brics shard`; pass --overwrite or choose another --out")
    state.mkdir(parents=True, exist_ok=True)
    for folder in (out, state):  # temporary files of a killed earlier run
        remove_stale_temporaries(folder)
    atomic_write_json(options_file, fingerprint)


def write_shards(
    out: Path,
    splits: dict[str, Sequence[Any]],
    process,
    options: ShardOptions,
    source: dict[str, Any],
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: Callable[[ShardResult, int], None] | None = None,
) -> dict[str, Any]:
    """Write every missing shard of the plan, then the manifest; returns the manifest.

    `out` is locked for the whole write: a second `brics shard` on the same folder is refused."""
    with FolderLock(out):
        return _write_shards(out, splits, process, options, source, workers, overwrite, progress)


def _write_shards(out, splits, process, options, source, workers, overwrite, progress) -> dict[str, Any]:
    from brics_cli import __version__

    fingerprint = {"source": source, "options": options.as_dict(), "counts_planned": {k: len(v) for k, v in splits.items()}}
    prepare_output(out, fingerprint, overwrite)
    jobs = plan_jobs(out, splits, process, options)
    results: dict[str, ShardResult] = {}
    todo = []
    for job in jobs:
        done = _done(out, job.name)
        if done is not None:
            results[job.name] = done
        else:
            todo.append(job)
    if progress is not None:
        for job in jobs:
            if job.name in results:
                progress(results[job.name], len(job.items))
    if workers <= 1:
        for job in todo:
            results[job.name] = run_job(job)
            if progress is not None:
                progress(results[job.name], len(job.items))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(run_job, job): job for job in todo}
            for future in as_completed(futures):
                job = futures[future]
                try:
                    results[job.name] = future.result()
                except Exception as exc:  # a worker crash must not lose the finished shards
                    raise BricsError(f"writing {job.name} failed: {type(exc).__name__}: {exc}; rerun to resume") from exc
                if progress is not None:
                    progress(results[job.name], len(job.items))
    return write_manifest(out, jobs, results, source, options, __version__)


def write_manifest(out, jobs, results, source, options, version) -> dict[str, Any]:
    counts = {split: 0 for split in ("train", "val")}
    failures: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for job in jobs:
        r = results[job.name]
        split = job.name.split("-")[0]
        counts[split] = counts.get(split, 0) + r.count
        for category, n in r.failures.items():
            failures[category] = failures.get(category, 0) + n
            room = EXAMPLES_PER_CATEGORY - len(examples.setdefault(category, []))
            examples[category].extend(r.examples.get(category, [])[: max(room, 0)])
    manifest = {
        "source": source,
        "options": options.as_dict(),
        "counts": counts,
        "failures": dict(sorted(failures.items())),
        "failure_examples": dict(sorted(examples.items())),
        "shards": {job.name: results[job.name].sha256 for job in jobs},
        "brics_version": version,
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest
