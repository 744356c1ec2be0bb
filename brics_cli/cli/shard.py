"""`brics shard folder|demo|verify`: raw images -> WebDataset shards + manifest.json, and their check."""

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
    items = list_folder(root)[:max_images] if max_images else list_folder(root)
    if not items:
        raise ConfigError(f"no files under {root}")
    n_val = val_count if val_count is not None else int(round(val_fraction * len(items)))
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
