"""`brics shard lsun|ffhq|webvid|folder|demo|verify`: raw data -> WebDataset shards + manifest.json, and their check."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from brics_cli.cli.output import emit_json

app = typer.Typer(help="Turn raw images into WebDataset shards (train/val) with a manifest.", no_args_is_help=True)

FILTERS = ("lanczos", "bicubic", "box")
FORMATS = ("png", "jpg", "webp")


def _options(resolution, resize_filter, fmt, quality, shard_size, seed, small, extra):
    from brics_cli.data.shards import ShardOptions
    from brics_cli.errors import ConfigError

    if resize_filter not in FILTERS:
        raise ConfigError(f"--resize-filter must be one of {', '.join(FILTERS)}, got '{resize_filter}'")
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if small not in ("skip", "upscale"):
        raise ConfigError(f"--small must be skip or upscale, got '{small}'")
    if resolution < 8 or shard_size < 1 or not 1 <= quality <= 100:
        raise ConfigError("--resolution must be >= 8, --shard-size >= 1 and --quality in 1..100")
    return ShardOptions(resolution, resize_filter, fmt, quality, shard_size, seed, small, tuple(sorted(extra.items())))


def _val_count(val_count: int | None, val_fraction: float, n_items: int) -> int:
    """--val-count if given, else --val-fraction of the items."""
    return val_count if val_count is not None else int(round(val_fraction * n_items))


def _run(out: Path, splits, process, options, source, workers: int, overwrite: bool, json_output: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from brics_cli.data.shards import write_shards

    total = sum(len(v) for v in splits.values())
    console = Console(stderr=True)
    start = time.perf_counter()
    with Progress(
        TextColumn("[bold]shard[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} img/s"),
        TimeRemainingColumn(), console=console, transient=json_output,
    ) as bar:
        task = bar.add_task("shard", total=total, rate="-")

        def progress(result, n_items):
            bar.advance(task, n_items)
            done = bar.tasks[0].completed
            bar.update(task, rate=f"{done / max(time.perf_counter() - start, 1e-9):.0f}")

        manifest = write_shards(out, splits, process, options, source, workers=workers, overwrite=overwrite, progress=progress)
    seconds = time.perf_counter() - start
    summary = {
        "out": str(out),
        "counts": manifest["counts"],
        "failures": manifest["failures"],
        "shards": len(manifest["shards"]),
        "seconds": round(seconds, 3),
        "images_per_s": round(total / seconds, 1) if seconds > 0 else None,
    }
    if json_output:
        emit_json(summary)
        return
    skipped = sum(manifest["failures"].values())
    detail = ", ".join(f"{k} {v}" for k, v in manifest["failures"].items())
    console.print(
        f"wrote {manifest['counts']['train']} train + {manifest['counts']['val']} val images in "
        f"{len(manifest['shards'])} shards to {out} ({seconds:.1f} s); skipped {skipped}" + (f" ({detail})" if detail else "")
    )


COMMON = dict(
    out=typer.Option(..., "--out", help="Output folder for {train,val}-NNNNNN.tar and manifest.json."),
    resize_filter=typer.Option("lanczos", "--resize-filter", help="lanczos | bicubic | box (antialiased)."),
    fmt=typer.Option("png", "--format", help="png | jpg | webp."),
    quality=typer.Option(95, "--quality", help="JPEG/WebP quality (WebP 100 = lossless)."),
    shard_size=typer.Option(1000, "--shard-size", help="Samples per shard."),
    workers=typer.Option(1, "--workers", help="Worker processes; the output does not depend on it."),
    seed=typer.Option(0, "--seed", help="Seed of the split and of random crops."),
    overwrite=typer.Option(False, "--overwrite", help="Replace shards made with other settings."),
    json_output=typer.Option(False, "--json", help="Print one JSON summary on stdout."),
)


@app.command("folder")
def shard_folder(
    root: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    out: Path = COMMON["out"],
    resolution: int = typer.Option(256, "--resolution", help="Output side in pixels (centre crop to the short side, then resize)."),
    resize_filter: str = COMMON["resize_filter"],
    fmt: str = COMMON["fmt"],
    quality: int = COMMON["quality"],
    val_count: Optional[int] = typer.Option(None, "--val-count", help="Images held out for val (default: --val-fraction)."),
    val_fraction: float = typer.Option(0.02, "--val-fraction", help="Fraction held out for val when --val-count is not given."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use only the first N files (sorted by path)."),
    small: str = typer.Option("skip", "--small", help="Images whose short side is below --resolution: skip | upscale."),
    shard_size: int = COMMON["shard_size"],
    workers: int = COMMON["workers"],
    seed: int = COMMON["seed"],
    overwrite: bool = COMMON["overwrite"],
    json_output: bool = COMMON["json_output"],
) -> None:
    """Any image folder -> shards. Corrupt, truncated, empty, non-image and too-small files are skipped and counted;
    CMYK, 16-bit, grayscale, palette and alpha images are converted to RGB."""
    from brics_cli.data.sources import list_folder, process_file, split_items
    from brics_cli.errors import ConfigError

    if not root.is_dir():
        raise ConfigError(f"folder not found: {root}")
    items = list_folder(root)[: max_images or None]
    if not items:
        raise ConfigError(f"no files under {root}")
    n_val = _val_count(val_count, val_fraction, len(items))
    options = _options(resolution, resize_filter, fmt, quality, shard_size, seed, small, {"val_count": n_val})
    splits = split_items(items, n_val, seed)
    source = {"type": "folder", "path": str(root.resolve()), "files": len(items)}
    _run(out, splits, process_file, options, source, workers, overwrite, json_output)


@app.command("demo")
def shard_demo(
    out: Path = COMMON["out"],
    resolution: int = typer.Option(64, "--resolution", help="Output side in pixels."),
    train_count: int = typer.Option(2048, "--train-count", help="Random crops of the 6 training photos."),
    val_count: int = typer.Option(256, "--val-count", help="Random crops of the 2 held-out photos."),
    resize_filter: str = COMMON["resize_filter"],
    fmt: str = COMMON["fmt"],
    quality: int = COMMON["quality"],
    shard_size: int = typer.Option(256, "--shard-size", help="Samples per shard."),
    workers: int = COMMON["workers"],
    seed: int = COMMON["seed"],
    overwrite: bool = COMMON["overwrite"],
    json_output: bool = COMMON["json_output"],
) -> None:
    """Real photos bundled with scikit-image -> random crops at the demo resolution; val crops come from held-out photos."""
    from brics_cli.data.sources import DEMO_TRAIN_PHOTOS, DEMO_VAL_PHOTOS, list_demo, process_demo

    options = _options(resolution, resize_filter, fmt, quality, shard_size, seed, "upscale", {"train_count": train_count, "val_count": val_count})
    splits = list_demo(train_count, val_count)
    source = {"type": "demo", "train_photos": list(DEMO_TRAIN_PHOTOS), "val_photos": list(DEMO_VAL_PHOTOS)}
    _run(out, splits, process_demo, options, source, workers, overwrite, json_output)


@app.command("lsun")
def shard_lsun(
    lmdb_dir: Path = typer.Argument(..., help="LSUN LMDB folder holding data.mdb (e.g. church_outdoor_train_lmdb)."),
    out: Path = COMMON["out"],
    resolution: int = typer.Option(256, "--resolution", help="Output side in pixels (centre crop to the short side, then resize)."),
    resize_filter: str = typer.Option("bicubic", "--resize-filter", help="lanczos | bicubic | box (antialiased); bicubic as LDM's churches."),
    fmt: str = COMMON["fmt"],
    quality: int = COMMON["quality"],
    val_lmdb: Optional[Path] = typer.Option(None, "--val-lmdb", help="LSUN's val LMDB (e.g. church_outdoor_val_lmdb): all of it becomes val."),
    val_count: Optional[int] = typer.Option(None, "--val-count", help="Images of LMDB_DIR held out for val (default: --val-fraction)."),
    val_fraction: float = typer.Option(0.02, "--val-fraction", help="Fraction held out for val when neither --val-count nor --val-lmdb is given."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use only the first N keys of LMDB_DIR (sorted)."),
    small: str = typer.Option("skip", "--small", help="Images whose short side is below --resolution: skip | upscale."),
    shard_size: int = COMMON["shard_size"],
    workers: int = COMMON["workers"],
    seed: int = COMMON["seed"],
    overwrite: bool = COMMON["overwrite"],
    json_output: bool = COMMON["json_output"],
) -> None:
    """LSUN LMDB (e.g. church_outdoor) -> shards; each worker opens the LMDB read-only itself. Corrupt, empty and
    too-small values are skipped and counted."""
    from brics_cli.data.lsun_ffhq import list_lsun, process_lmdb
    from brics_cli.data.sources import split_items
    from brics_cli.errors import ConfigError

    items = list_lsun(lmdb_dir)[: max_images or None]
    if val_lmdb is not None:
        if val_count:
            raise ConfigError("--val-count and --val-lmdb exclude each other: with --val-lmdb, val is that whole LMDB")
        splits = {"train": items, "val": list_lsun(val_lmdb)}
        n_val = len(splits["val"])
    else:
        n_val = _val_count(val_count, val_fraction, len(items))
        splits = split_items(items, n_val, seed)
    options = _options(resolution, resize_filter, fmt, quality, shard_size, seed, small, {"val_count": n_val})
    source = {
        "type": "lsun",
        "path": str(lmdb_dir.resolve()),
        "keys": len(items),
        "val_lmdb": str(val_lmdb.resolve()) if val_lmdb is not None else None,
        "split": "val-lmdb" if val_lmdb is not None else "random",
    }
    _run(out, splits, process_lmdb, options, source, workers, overwrite, json_output)


@app.command("ffhq")
def shard_ffhq(
    path: Path = typer.Argument(..., help="FFHQ images1024x1024/ folder, its parent, or a zip of the tree."),
    out: Path = COMMON["out"],
    resolution: int = typer.Option(256, "--resolution", help="Output side in pixels (centre crop to the short side, then resize)."),
    resize_filter: str = typer.Option("box", "--resize-filter", help="lanczos | bicubic | box (antialiased); box for StyleGAN2 FID parity."),
    fmt: str = COMMON["fmt"],
    quality: int = COMMON["quality"],
    split: str = typer.Option("official", "--split", help="official (ids < 60000 train, the rest val) | random (--val-count/--val-fraction)."),
    val_count: Optional[int] = typer.Option(None, "--val-count", help="With --split random: images held out for val (default: --val-fraction)."),
    val_fraction: float = typer.Option(0.02, "--val-fraction", help="With --split random: fraction held out when --val-count is not given."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use only the N smallest ids."),
    small: str = typer.Option("skip", "--small", help="Images whose short side is below --resolution: skip | upscale."),
    shard_size: int = COMMON["shard_size"],
    workers: int = COMMON["workers"],
    seed: int = COMMON["seed"],
    overwrite: bool = COMMON["overwrite"],
    json_output: bool = COMMON["json_output"],
) -> None:
    """FFHQ (folder tree or zip) -> shards, indexed by the integer id of each <id>.png. Zip entries with absolute or '..'
    paths (unsafe_path) and PNGs without a numeric name (bad_name) are counted, never read."""
    from brics_cli.data.lsun_ffhq import FFHQ_SPLITS, ffhq_splits, list_ffhq, process_ffhq
    from brics_cli.errors import ConfigError

    if split not in FFHQ_SPLITS:
        raise ConfigError(f"--split must be official or random, got '{split}'")
    if val_count is not None and split == "official":
        raise ConfigError("--val-count needs --split random: the official split is fixed (ids >= 60000 are val)")
    items = list_ffhq(path)
    images = [it for it in items if not it.skip][: max_images or None]
    extra = {"split": split}
    if split == "random":
        extra["val_count"] = _val_count(val_count, val_fraction, len(images))
    options = _options(resolution, resize_filter, fmt, quality, shard_size, seed, small, extra)
    splits = ffhq_splits(images + [it for it in items if it.skip], split, extra.get("val_count", 0), seed)
    source = {
        "type": "ffhq",
        "path": str(path.resolve()),
        "container": "folder" if path.is_dir() else "zip",
        "images": len(images),
        "split": split,
    }
    _run(out, splits, process_ffhq, options, source, workers, overwrite, json_output)


@app.command("verify")
def shard_verify(
    root: Path = typer.Argument(..., help="Folder written by `brics shard`."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Check the sha256 of every shard against manifest.json and decode every sample; exit 1 on any problem."""
    from brics_cli.data.verify import verify_shards
    from brics_cli.errors import BricsError

    report = verify_shards(root)
    if json_output:
        emit_json(report)
    else:
        print(f"{root}: {report['shards']} shards, {report['samples']} samples, {len(report['problems'])} problems")
        for problem in report["problems"][:20]:
            print(f"  {problem}")
    if report["problems"]:
        raise BricsError(f"{len(report['problems'])} problems in {root} (first: {report['problems'][0]})")


@app.command("webvid")
def shard_webvid(
    csv_path: Path = typer.Argument(..., help="WebVid training CSV (e.g. results_2M_train.csv); columns read by name."),
    videos: Path = typer.Option(..., "--videos", help="Folder holding <page_dir>/<videoid>.mp4."),
    out: Path = COMMON["out"],
    frames: int = typer.Option(200000, "--frames", help="Training frames, each from a clip drawn with replacement."),
    val_csv: Optional[Path] = typer.Option(None, "--val-csv", help="WebVid validation CSV; its frames form the val split."),
    val_frames: int = typer.Option(5000, "--val-frames", help="Frames drawn from --val-csv."),
    resolution: int = typer.Option(256, "--resolution", help="Output side in pixels (random square crop of the short side, then resize)."),
    resize_filter: str = COMMON["resize_filter"],
    fmt: str = COMMON["fmt"],
    quality: int = COMMON["quality"],
    small: str = typer.Option("skip", "--small", help="Videos whose short side is below --resolution: skip | upscale."),
    shard_size: int = COMMON["shard_size"],
    workers: int = COMMON["workers"],
    seed: int = COMMON["seed"],
    overwrite: bool = COMMON["overwrite"],
    json_output: bool = COMMON["json_output"],
) -> None:
    """WebVid-10M clips -> Webvid-Frames200k (Suppl. L): each sample a random frame of a random clip, randomly
    cropped square. Missing, zero-byte placeholder and undecodable videos are skipped and counted."""
    from brics_cli.data.webvid import plan_webvid, process_frame
    from brics_cli.errors import ConfigError

    if not videos.is_dir():
        raise ConfigError(f"--videos folder not found: {videos}")
    if frames < 1 or val_frames < 0:
        raise ConfigError("--frames must be >= 1 and --val-frames >= 0")
    n_val = val_frames if val_csv is not None else 0
    options = _options(resolution, resize_filter, fmt, quality, shard_size, seed, small, {"frames": frames, "val_frames": n_val})
    splits, rows = plan_webvid(csv_path, videos, frames, seed, val_csv, n_val)
    source = {
        "type": "webvid",
        "csv": str(csv_path.resolve()),
        "val_csv": str(val_csv.resolve()) if val_csv is not None else None,
        "videos": str(videos.resolve()),
        "rows": rows,
        "frames_planned": {split: len(items) for split, items in splits.items()},
    }
    _run(out, splits, process_frame, options, source, workers, overwrite, json_output)
