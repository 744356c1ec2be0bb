"""Where `brics eval` and `brics nn-search` find their images when not told.

- Samples: a folder written by `brics sample` -- PNGs plus `manifest.json` with at least
  {"run", "checkpoint_sha256", "sampler", "steps", "seed", "count", "files"}. Without `--samples`,
  the newest such manifest under `./runs/` is used (`brics_cli.runs.newest_samples`).
- Reference: `--ref` is a shard folder (has a `brics shard` manifest.json) or a plain image folder.
  Without it, the training data recorded for the samples: the manifest's "data" (a shard folder),
  else `data.shards` of the run's `config.yaml` (the "run" folder, then its parent).
- A shard folder is exported once, as the images stored in its tars (no re-encoding), into a cache
  folder the metric libraries can read: `$BRICS_CACHE_DIR` (default `~/.cache/brics`)
  `/reference/<sha256 of manifest.json, 16 hex>-<split>/`; it is reused while the shard manifest's
  hash is unchanged and every exported file keeps the size it was written with. The export is
  written to a temporary folder and renamed into place, under a file lock
  (`$BRICS_CACHE_DIR/locks/reference-<folder>.lock`), so parallel runs on one reference export it once.
- Reconstructions: a folder written by `brics reconstruct` holding `inputs/` and `recon/` with PNGs of
  the same names (pairs matched by name).
- Unreadable images (truncated, empty, not an image) are left out and named in the result
  (`unreadable_report`); when more than `MAX_UNREADABLE` of a set is unreadable no metric is
  reported, since it would describe another set than the one asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from brics_cli.core.files import sha256_bytes
from brics_cli.core.images import IMAGE_SUFFIXES
from brics_cli.errors import BricsError, ConfigError
from brics_cli.runs import SAMPLE_KEYS, is_sample_manifest

MAX_UNREADABLE = 0.01  # the largest fraction of a set that may be left out as unreadable; more refuses the metric
LISTED_UNREADABLE = 10  # file names an `unreadable` record lists


@dataclass
class ImageSet:
    """A set of image files with an identity: what it is, where, and a fingerprint for caches."""

    files: list[Path]
    path: Path  # folder of the files (for shards: the export cache)
    fingerprint: str
    kind: str  # "samples" | "shards" | "folder"
    manifest_sha256: str | None = None
    source: str | None = None  # the shard folder for kind "shards"
    split: str | None = None
    manifest: dict | None = None  # the samples' manifest

    def describe(self) -> str:
        where = f"{self.source} ({self.split} split, exported to {self.path})" if self.kind == "shards" else str(self.path)
        return f"{len(self.files)} images from {where}"

    def repair_hint(self) -> str:
        """How to get rid of unreadable files in this set, for an error message."""
        if self.kind == "shards":
            return f"delete the export cache {self.path} to export the shards again (`brics shard verify` checks the shards)"
        if self.manifest is not None:
            return "rerun the same `brics sample` command: it rewrites unreadable images"
        return f"repair or remove them from {self.path}"


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name; hidden files and contact sheets (grid.png, nn-grid.png) left out."""
    return sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and not p.name.endswith("grid.png") and p.is_file()
    )


def fingerprint_files(files: Sequence[Path]) -> str:
    """Identity of a plain image folder: names, sizes and modification times."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_samples(folder: Path, n: int | None = None, strict: bool = True) -> ImageSet:
    """A samples folder: the manifest's files in order (first `n`; more than it holds is an error when
    `strict`), or its images when it has no manifest."""
    if not folder.is_dir():
        raise ConfigError(f"--samples: folder not found: {folder}")
    manifest_path = folder / "manifest.json"
    manifest, manifest_sha = None, None
    if manifest_path.is_file():
        raw = manifest_path.read_bytes()
        manifest, manifest_sha = json.loads(raw), sha256_bytes(raw)
        if not is_sample_manifest(manifest):
            missing = [k for k in SAMPLE_KEYS if k not in manifest]
            raise ConfigError(f"{manifest_path} is not a `brics sample` manifest (missing {', '.join(missing)})")
        files = [folder / name for name in manifest["files"]]
        absent = [p.name for p in files if not p.is_file()]
        if absent:
            raise BricsError(f"{folder}: {len(absent)} files named in manifest.json are missing (first: {absent[0]})")
    else:
        files = list_images(folder)
    if n is not None:
        if strict and n > len(files):
            raise ConfigError(f"--limit {n}: {folder} holds only {len(files)} images")
        files = files[:n]
    if not files:
        raise ConfigError(f"no images in {folder}")
    # The files' sizes and times too, not only the manifest: a damaged or rewritten image is another set.
    fingerprint = fingerprint_files(files)
    if manifest_sha:
        fingerprint = hashlib.sha256(f"{manifest_sha}:{fingerprint}".encode()).hexdigest()
    return ImageSet(files, folder, fingerprint, "samples", manifest_sha, manifest=manifest)


def recorded_reference(samples: ImageSet) -> str | None:
    """The training data of the run that made the samples: manifest "data", else the run's config data.shards."""
    manifest = samples.manifest or {}
    if manifest.get("data"):
        return str(manifest["data"])
    run = manifest.get("run")
    if not run:
        return None
    import yaml

    for candidate in (Path(run) / "config.yaml", Path(run).parent / "config.yaml"):
        if candidate.is_file():
            try:
                shards = (yaml.safe_load(candidate.read_text()) or {}).get("data", {}).get("shards")
            except (yaml.YAMLError, AttributeError):
                continue
            if shards:
                return str(shards)
    return None


def cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("BRICS_CACHE_DIR", "~/.cache/brics")))


def load_reference(ref: str, split: str = "train", n: int | None = None, progress: Callable[[int, int], None] | None = None) -> ImageSet:
    """A shard folder (exported once to the PNG cache) or a plain image folder."""
    folder = Path(ref)
    if not folder.is_dir():
        raise ConfigError(f"--ref: {ref} is neither a shard folder nor an image folder")
    manifest = folder / "manifest.json"
    if manifest.is_file() and "shards" in json.loads(manifest.read_text()):
        image_set = export_shards(folder, split, progress)
    else:
        files = list_images(folder)
        if not files:
            raise ConfigError(f"--ref: no images in {folder}")
        image_set = ImageSet(files, folder, fingerprint_files(files), "folder")
    if n is not None and n < len(image_set.files):
        image_set.files = image_set.files[:n]
    return image_set


def export_shards(shards: Path, split: str, progress: Callable[[int, int], None] | None = None) -> ImageSet:
    """Write every image of `split` from the shards into the cache as `<key>.<ext>` (bytes as stored)."""
    raw = (shards / "manifest.json").read_bytes()
    manifest, manifest_sha = json.loads(raw), sha256_bytes(raw)
    names = sorted(n for n in manifest["shards"] if n.startswith(f"{split}-"))
    if not names:
        raise ConfigError(f"--ref: {shards} has no '{split}' shards")
    target = cache_root() / "reference" / f"{manifest_sha[:16]}-{split}"
    done = _finished_export(target, manifest_sha)
    if done is not None:
        return ImageSet(done, target, manifest_sha, "shards", manifest_sha, str(shards.resolve()), split)
    from brics_cli.eval.features import fill_lock  # here: features.py imports torch, this module need not

    with fill_lock(target):  # a parallel `brics eval` on the same shards exports once; the other waits, then reads
        done = _finished_export(target, manifest_sha)
        if done is not None:
            return ImageSet(done, target, manifest_sha, "shards", manifest_sha, str(shards.resolve()), split)
        return _export(shards, manifest, manifest_sha, names, split, target, progress)


def _finished_export(target: Path, manifest_sha: str) -> list[Path] | None:
    """The files of a complete, intact export of these shards in `target`, or None."""
    record = target / "export.json"
    if not record.is_file():
        return None
    try:
        done = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    files = [target / f for f in done.get("files", [])]
    return files if done.get("manifest_sha256") == manifest_sha and _intact(files, done.get("sizes")) else None


def _export(shards: Path, manifest: dict, manifest_sha: str, names: list[str], split: str, target: Path,
            progress: Callable[[int, int], None] | None) -> ImageSet:
    total = manifest["counts"].get(split, 0)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files, sizes = [], []
    for name in names:
        with tarfile.open(shards / name) as tar:
            for member in tar:
                stem, _, ext = member.name.partition(".")
                if "." + ext.lower() not in IMAGE_SUFFIXES or not member.isfile() or "/" in stem:
                    continue
                (tmp / f"{stem}.{ext}").write_bytes(tar.extractfile(member).read())
                files.append(f"{stem}.{ext}")
                sizes.append(member.size)
                if progress is not None:
                    progress(1, total)
    (tmp / "export.json").write_text(json.dumps({
        "shards": str(shards.resolve()), "manifest_sha256": manifest_sha, "split": split, "count": len(files), "files": files,
        "sizes": sizes,
    }))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return ImageSet([target / f for f in files], target, manifest_sha, "shards", manifest_sha, str(shards.resolve()), split)


def unreadable_report(what: str, total: int, unreadable: dict[str, str], fix: str) -> dict:
    """`{"count", "files": the first names}` of the `unreadable` files (name -> "PATH: reason") among
    `total`; more than MAX_UNREADABLE of them is an error naming how many, the first one and `fix`."""
    names = list(unreadable)
    if len(names) > MAX_UNREADABLE * total:
        raise BricsError(
            f"{len(names)} of {total} {what} are unreadable, more than the {MAX_UNREADABLE:.0%} a metric may leave out "
            f"(first: {unreadable[names[0]]}); {fix}"
        )
    return {"count": len(names), "files": names[:LISTED_UNREADABLE]}


def _intact(files: list[Path], sizes: list[int] | None) -> bool:
    """Every exported file still there with the size it was written with (a cut-short cache file is re-exported)."""
    if sizes is None or len(sizes) != len(files):
        return False  # an export from before sizes were recorded: redone once
    try:
        return all(p.stat().st_size == size for p, size in zip(files, sizes))
    except OSError:
        return False


def reconstruction_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(input, reconstruction) file pairs of a `brics reconstruct` folder, matched by name."""
    inputs, recons = folder / "inputs", folder / "recon"
    if not (inputs.is_dir() and recons.is_dir()):
        raise ConfigError(f"{folder} is not a reconstruction folder: it needs inputs/ and recon/ with PNGs of the same names")
    a = {p.name: p for p in list_images(inputs)}
    b = {p.name: p for p in list_images(recons)}
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise BricsError(f"{folder}: inputs/ and recon/ differ in {len(only)} file names (first: {only[0]})")
    if not a:
        raise ConfigError(f"{folder}: no images in inputs/")
    return [(a[name], b[name]) for name in sorted(a)]
