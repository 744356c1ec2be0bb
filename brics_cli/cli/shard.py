"""`brics shard NAME|verify`: raw data -> WebDataset shards + manifest.json, and their check.

NAME is any entry of the `sources` registry -- folder, demo, lsun, ffhq, webvid, and every source a
third-party distribution advertises in the entry-point group `brics.sources`. Each gets the same
command, built from its `Options` dataclass and the common options below (brics_cli/data/sources/
base.py describes the protocol), that plans the run with `source.plan` and writes it with
`write_shards` and `source.process`. The commands are built when the `shard` group is first used,
so `brics --help` and the other commands import no source.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import time
import typing
from pathlib import Path
from typing import Any, MutableMapping

import typer
from typer.core import TyperGroup
from typer.models import CommandInfo

from brics_cli.cli.output import emit_json

FILTERS = ("lanczos", "bicubic", "box")
FORMATS = ("png", "jpg", "webp")


@dataclasses.dataclass(frozen=True)
class Common:
    """An option every source command has; a source may change its default and help, or fix it."""

    flag: str
    type: Any
    default: Any
    help: str


# In --help order. A source's own options are listed before the common option their `before` names.
COMMON: dict[str, Common] = {
    "out": Common("--out", Path, ..., "Output folder for {train,val}-NNNNNN.tar and manifest.json."),
    "resolution": Common("--resolution", int, 256, "Output side in pixels (centre crop to the short side, then resize)."),
    "resize_filter": Common("--resize-filter", str, "lanczos", "lanczos | bicubic | box (antialiased)."),
    "format": Common("--format", str, "png", "png | jpg | webp."),
    "quality": Common("--quality", int, 95, "JPEG/WebP quality (WebP 100 = lossless)."),
    "small": Common("--small", str, "skip", "Images whose short side is below --resolution: skip | upscale."),
    "shard_size": Common("--shard-size", int, 1000, "Samples per shard."),
    "workers": Common("--workers", int, 1, "Worker processes; the output does not depend on it."),
    "seed": Common("--seed", int, 0, "Seed of the split and of random crops."),
    "overwrite": Common("--overwrite", bool, False, "Replace shards made with other settings."),
    "json": Common("--json", bool, False, "Print one JSON summary on stdout."),
}
SHARD_OPTIONS = ("resolution", "resize_filter", "format", "quality", "shard_size", "seed", "small")  # ShardOptions' order


class ShardGroup(TyperGroup):
    """The `shard` group: its own commands (`verify`) plus one per `SOURCES` entry, added on first use."""

    @property  # type: ignore[override]
    def commands(self) -> MutableMapping[str, Any]:
        if not self._sources_added:
            from brics_cli.registry import SOURCES

            built = {name: source_command(name, self.rich_markup_mode) for name in SOURCES.names() if name not in self._table}
            self._table, self._sources_added = {**built, **self._table}, True
        return self._table

    @commands.setter
    def commands(self, value: MutableMapping[str, Any]) -> None:
        self._table, self._sources_added = dict(value), False

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        # `verify` needs no source: a broken third-party plugin must not take it down.
        return self._table.get(cmd_name) or super().get_command(ctx, cmd_name)


app = typer.Typer(
    cls=ShardGroup, help="Turn raw images into WebDataset shards (train/val) with a manifest.", no_args_is_help=True
)


def source_command(name: str, rich_markup_mode: Any = None) -> Any:
    """The click command of `brics shard NAME`: typer reads its parameters from a generated signature."""
    from brics_cli.data.sources.base import Source
    from brics_cli.errors import RegistryError
    from brics_cli.registry import SOURCES

    source_cls = SOURCES.get(name)
    if not (isinstance(source_cls, type) and issubclass(source_cls, Source)):
        raise RegistryError(f"source '{name}' ({source_cls!r}) is not a subclass of brics_cli.data.sources.Source")
    source = source_cls()
    parameters = source_parameters(name, source)

    def command(**values: Any) -> None:
        shard_with(source, values)

    command.__name__ = command.__qualname__ = f"shard_{name.replace('-', '_')}"
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    info = CommandInfo(name=name, callback=command, help=source.help)
    return typer.main.get_command_from_info(info, pretty_exceptions_short=True, rich_markup_mode=rich_markup_mode)


def source_parameters(name: str, source: Any) -> list[inspect.Parameter]:
    """The source's arguments, then the common options with the source's own ones among them."""
    from brics_cli.errors import RegistryError

    hints = typing.get_type_hints(source.Options)
    fields = [f for f in dataclasses.fields(source.Options) if f.init]
    wrong = [f.name for f in fields if f.name in COMMON or f.metadata.get("before", "small") not in COMMON]
    if wrong:
        raise RegistryError(f"source '{name}': options {', '.join(wrong)} clash with common options or name no common option in `before`")
    own = [(f.metadata.get("before", "small"), f.metadata.get("argument", False), _own_parameter(f, hints[f.name])) for f in fields]
    parameters = [p for _, is_argument, p in own if is_argument]
    for key, common in COMMON.items():
        parameters += [p for before, is_argument, p in own if before == key and not is_argument]
        if key not in source.fixed:
            option = typer.Option(source.defaults.get(key, common.default), common.flag, help=source.helps.get(key, common.help))
            parameters.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=common.type))
    return parameters


def _own_parameter(f: dataclasses.Field, annotation: Any) -> inspect.Parameter:
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = ...  # required
    help_text = f.metadata.get("help")
    if f.metadata.get("argument"):
        info = typer.Argument(default, help=help_text)
    else:
        info = typer.Option(default, "--" + f.name.replace("_", "-"), help=help_text)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def shard_with(source: Any, values: dict[str, Any]) -> None:
    """Run `brics shard NAME` with the parsed flags: validate, plan, write, report."""
    values = {**source.fixed, **values}
    out, workers, overwrite, json_output = (values.pop(key) for key in ("out", "workers", "overwrite", "json"))
    options = shard_options(*(values.pop(key) for key in SHARD_OPTIONS))
    plan = source.plan(source.Options(**values), options)
    options = dataclasses.replace(options, extra=tuple(sorted(plan.extra.items())))
    _write(out, plan, source.process, options, workers, overwrite, json_output)


def shard_options(resolution: int, resize_filter: str, fmt: str, quality: int, shard_size: int, seed: int, small: str):
    """The common options, checked, as `ShardOptions` (the source's `extra` is added after its plan)."""
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
    return ShardOptions(resolution, resize_filter, fmt, quality, shard_size, seed, small)


def _write(out: Path, plan, process, options, workers: int, overwrite: bool, json_output: bool) -> None:
    from brics_cli.core.progress import Progress
    from brics_cli.data.shards import write_shards

    total = sum(len(items) for items in plan.splits.values())
    start = time.perf_counter()
    with Progress(enabled=True, transient=json_output) as progress:
        task = progress.task("shard", total, unit="img")
        manifest = write_shards(
            out, plan.splits, process, options, plan.source, workers=workers, overwrite=overwrite,
            progress=lambda result, n_items: task.advance(n_items),
        )
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
    print(
        f"wrote {manifest['counts']['train']} train + {manifest['counts']['val']} val images in "
        f"{len(manifest['shards'])} shards to {out} ({seconds:.1f} s); skipped {skipped}" + (f" ({detail})" if detail else ""),
        file=sys.stderr,
    )


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
