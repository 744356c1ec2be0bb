"""Strict recipes: overrides, types, and one-line errors with exit code 2 (DESIGN.md section 6)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from brics_cli.cli import main
from brics_cli.config import parse_override, to_dict
from brics_cli.errors import ConfigError
from brics_cli.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load_and_open_with_a_comment(path):
    cfg = load_recipe(path)
    assert isinstance(cfg, Recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 20
    assert "Hardware" in path.read_text().split("data:")[0]


def test_overrides_are_typed_and_applied():
    cfg = load_recipe(ROOT / "recipes/church.yaml", ["ae.grid.levels=8", "ae.optim.betas=[0.5, 0.9]", "run.dir=runs/x"])
    assert cfg.ae.grid.levels == 8
    assert cfg.ae.optim.betas == (0.5, 0.9)
    assert cfg.run.dir == "runs/x"
    assert cfg.ae.optim.eps == 1e-15  # written as 1.0e-15 in YAML
    assert parse_override("ae.grid.r_max=null") == ("ae.grid.r_max", None)


def test_yaml_11_float_strings_are_accepted(tmp_path):
    (tmp_path / "r.yaml").write_text("ae:\n  optim:\n    eps: 1e-15\n")  # PyYAML reads this as a string
    assert load_recipe(tmp_path / "r.yaml").ae.optim.eps == 1e-15


def test_resolved_config_round_trips(tmp_path):
    import yaml

    cfg = load_recipe(ROOT / "recipes/demo.yaml")
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_recipe(tmp_path / "resolved.yaml") == cfg


GOOD = (ROOT / "recipes/demo.yaml").read_text()

# (name, recipe text or None for "missing file", overrides, fragments the one-line message must contain)
MALFORMED = [
    ("unknown key", GOOD.replace("    levels: 8", "    levelz: 8"), [], ["ae.grid.levelz", "did you mean 'ae.grid.levels'", "bad.yaml:"]),
    ("unknown section", GOOD.replace("run:", "runn:"), [], ["runn", "did you mean 'run'", "bad.yaml:"]),
    ("wrong type", GOOD.replace("    levels: 8", "    levels: eight"), [], ["ae.grid.levels", "integer", "bad.yaml:"]),
    ("bad choice", GOOD.replace("tiling: interleaved", "tiling: interleave"), [], ["ae.code.tiling", "did you mean 'interleaved'"]),
    ("malformed yaml", GOOD.replace("  resolution: 64\n", "  resolution: [64\n", 1), [], ["malformed YAML", "bad.yaml"]),
    ("missing file", None, [], ["not found", "bad.yaml"]),
    ("unknown decoder", GOOD.replace("name: stylegan", "name: stylegn"), [], ["ae.decoder.name", "did you mean 'stylegan'"]),
    ("unknown retrieval", GOOD.replace("retrieval: grid", "retrieval: hsh"), [], ["hsh", "did you mean 'hash'", "bad.yaml"]),
    ("override unknown key", GOOD, ["ae.gird.levels=8"], ["ae.gird", "did you mean 'ae.grid'", "override"]),
    ("override without =", GOOD, ["ae.grid.levels"], ["ae.grid.levels", "section.key=value"]),
    ("inconsistent sizes", GOOD.replace("    channels: 4\n", "    channels: 5\n    key_channels: 2\n", 1).replace("    key_channels: 1\n", "", 1), [], ["ae.code.channels", "key_channels", "bad.yaml"]),
    ("section given a value", GOOD.replace("  mlp:\n    hidden: 32\n    layers: 3\n", "  mlp: 3\n"), [], ["ae.mlp", "section"]),
    ("list of wrong length", GOOD.replace("betas: [0.9, 0.99]", "betas: [0.9]"), [], ["ae.optim.betas", "2 values"]),
]


@pytest.mark.parametrize("name, text, overrides, fragments", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_recipe_exits_2_with_one_line(tmp_path, capsys, monkeypatch, name, text, overrides, fragments):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    monkeypatch.delenv("BRICS_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["brics", "info", str(path), *overrides])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def test_config_error_from_a_real_process_has_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("    levels: 8", "    levelz: 8"))
    env = {k: v for k, v in os.environ.items() if k != "BRICS_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "brics_cli", "info", str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    debug = subprocess.run(
        [sys.executable, "-m", "brics_cli", "info", str(path)], capture_output=True, text=True, env={**env, "BRICS_DEBUG": "1"}
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_validation_error_names_the_key():
    with pytest.raises(ConfigError, match="ae.features.resolution"):
        load_recipe(ROOT / "recipes/demo.yaml", ["ae.features.resolution=24"])
