"""Sources are plugins: a third-party distribution's `brics.sources` entry point becomes `brics shard NAME`.

The toy distribution is written here and really installed (pip, into a --target folder put on
PYTHONPATH), so discovery goes through its dist-info and entry point like any installed plugin.
"""

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import typer.main
from PIL import Image

from brics_cli.errors import RegistryError

TOY_PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "brics-toy-source"
version = "0.1.0"

[tool.setuptools]
py-modules = ["brics_toy_source"]

[project.entry-points."brics.sources"]
toy = "brics_toy_source:ToySource"
"""

TOY_MODULE = '''
"""A toy brics source: solid-colour squares, darker with each index; no input files."""

import random
from dataclasses import dataclass

from PIL import Image, ImageColor

from brics_cli.data.shards import ShardOptions
from brics_cli.data.sources import Plan, Source, option, sample_files
from brics_cli.errors import ConfigError


@dataclass(frozen=True)
class ToyItem:
    id: str
    rgb: tuple


@dataclass
class ToyOptions:
    count: int = option(10, help="Squares to draw; the last --val-count are val.")
    val_count: int = option(2, help="Squares held out for val.")
    colour: str = option("red", help="Colour of the brightest square (a CSS name or #rrggbb).")


class ToySource(Source):
    help = "Toy colour squares -> shards, without any input files."
    Options = ToyOptions
    defaults = {"resolution": 16, "shard_size": 4}

    def plan(self, opts: ToyOptions, options: ShardOptions) -> Plan:
        try:
            rgb = ImageColor.getrgb(opts.colour)
        except ValueError:
            raise ConfigError(f"--colour: unknown colour '{opts.colour}'") from None
        items = [ToyItem(f"{i:04d}", tuple(c * (opts.count - i) // opts.count for c in rgb)) for i in range(opts.count)]
        n_train = opts.count - opts.val_count
        extra = {"count": opts.count, "val_count": opts.val_count, "colour": opts.colour}
        return Plan({"train": items[:n_train], "val": items[n_train:]}, {"type": "toy", "colour": opts.colour}, extra)

    @staticmethod
    def process(item: ToyItem, options: ShardOptions, rng: random.Random) -> dict:
        image = Image.new("RGB", (options.resolution, options.resolution), item.rgb)
        return sample_files(image, options, {"source_id": item.id, "rgb": list(item.rgb)})
'''


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory):
    """The environment of a `brics` whose Python path holds the installed toy distribution."""
    root = tmp_path_factory.mktemp("toy")
    project, site = root / "brics-toy-source", root / "site"
    project.mkdir()
    (project / "pyproject.toml").write_text(textwrap.dedent(TOY_PYPROJECT))
    (project / "brics_toy_source.py").write_text(TOY_MODULE)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--disable-pip-version-check", "--target", str(site), str(project)],
        check=True, capture_output=True, cwd=root,
    )
    assert list(site.glob("brics_toy_source-0.1.0.dist-info"))
    env = {k: v for k, v in os.environ.items() if k not in ("BRICS_LOAD_PLUGINS", "BRICS_DEBUG")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["BRICS_PROGRESS"] = "off"
    return env


def brics(env, *args):
    return subprocess.run([sys.executable, "-m", "brics_cli", *map(str, args)], capture_output=True, text=True, env=env)


def test_plugins_list_shows_the_toy_source_and_its_distribution(toy_env):
    proc = brics(toy_env, "plugins", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    entries = {e["name"]: e for e in json.loads(proc.stdout)["sources"]}
    assert {"demo", "ffhq", "folder", "lsun", "webvid", "toy"} <= set(entries)
    toy = entries["toy"]
    assert toy["module"] == "brics_toy_source" and toy["version"] == "0.1.0"
    assert toy["distribution"].replace("_", "-") == "brics-toy-source"


def test_the_toy_source_is_a_shard_command_with_its_options(toy_env):
    group = brics(toy_env, "shard", "--help")
    assert group.returncode == 0 and "toy" in group.stdout and "Toy colour squares" in group.stdout
    command = brics(toy_env, "shard", "toy", "--help")
    assert command.returncode == 0, command.stderr
    for flag in ("--colour", "--count", "--val-count", "--out", "--resolution", "--small", "--workers", "--json"):
        assert flag in command.stdout, flag


def test_shard_toy_writes_verifiable_shards(toy_env, tmp_path):
    out = tmp_path / "toy"
    proc = brics(toy_env, "shard", "toy", "--out", out, "--count", 11, "--val-count", 3, "--colour", "#ff8000",
                 "--workers", 2, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["counts"] == {"train": 8, "val": 3} and summary["shards"] == 3  # 4 + 4 train, 3 val (--shard-size 4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == {"type": "toy", "colour": "#ff8000"}
    assert manifest["options"]["resolution"] == 16  # the source's default
    assert manifest["options"]["extra"] == {"colour": "#ff8000", "count": 11, "val_count": 3}
    with tarfile.open(out / "val-000000.tar") as tar:
        first = np.asarray(Image.open(tar.extractfile("00000000.png")))
    assert first.shape == (16, 16, 3) and (first == [255 * 3 // 11, 128 * 3 // 11, 0]).all()
    verify = brics(toy_env, "shard", "verify", out, "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["samples"] == 11


def test_a_plugin_raises_config_errors_like_a_builtin(toy_env, tmp_path):
    proc = brics(toy_env, "shard", "toy", "--out", tmp_path / "x", "--colour", "nonsense")
    assert proc.returncode == 2 and "error: --colour: unknown colour 'nonsense'" in proc.stderr


EXPECTED_FLAGS = {  # the documented command lines of the built-ins (README), in --help order
    "folder": "root --out --resolution --resize-filter --format --quality --val-count --val-fraction --max-images --small "
    "--shard-size --workers --seed --overwrite --json",
    "demo": "--out --resolution --train-count --val-count --resize-filter --format --quality --shard-size --workers --seed "
    "--overwrite --json",
    "lsun": "lmdb_dir --out --resolution --resize-filter --format --quality --val-lmdb --val-count --val-fraction "
    "--max-images --small --shard-size --workers --seed --overwrite --json",
    "ffhq": "path --out --resolution --resize-filter --format --quality --split --val-count --val-fraction --max-images "
    "--small --shard-size --workers --seed --overwrite --json",
    "webvid": "csv_path --videos --out --frames --val-csv --val-frames --resolution --resize-filter --format --quality "
    "--small --shard-size --workers --seed --overwrite --json",
}


def test_builtin_sources_are_registry_entries_with_their_flags():
    from brics_cli.cli import app
    from brics_cli.data.sources import Source
    from brics_cli.registry import SOURCES

    shard = typer.main.get_command(app).commands["shard"]
    for name, flags in EXPECTED_FLAGS.items():
        assert issubclass(SOURCES.get(name), Source)
        params = [p for p in shard.commands[name].params if p.name != "help"]
        assert " ".join(p.opts[0] if p.opts[0].startswith("--") else p.name for p in params) == flags
    defaults = {p.name: p.default for p in shard.commands["lsun"].params}
    assert defaults["resize_filter"] == "bicubic" and defaults["resolution"] == 256
    assert {p.name: p.default for p in shard.commands["demo"].params}["shard_size"] == 256


def test_a_source_whose_option_shadows_a_common_option_is_refused():
    from dataclasses import dataclass

    from brics_cli.cli.shard import source_parameters
    from brics_cli.data.sources import Source, option

    @dataclass
    class Clash:
        seed: int = option(1, help="Shadows --seed.")

    class Bad(Source):
        Options = Clash

    with pytest.raises(RegistryError, match="seed"):
        source_parameters("bad", Bad())
