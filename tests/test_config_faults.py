"""Recipe validation gaps (issue #15): files and values that used to pass or crash now exit 2 with one line.

Each fault is written for real (a 0-byte file, random bytes, a PNG, a directory, a repeated key, a
value past int64, nan/inf) and fed both to `brics ae-train FILE --dry-run` and to `load_recipe`.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from brics_cli.errors import ConfigError
from brics_cli.recipe import load_recipe
from conftest import run_in_process as run_cli

ROOT = Path(__file__).resolve().parents[1]
GOOD = (ROOT / "recipes/demo.yaml").read_text()
INT64_MAX = 2**63 - 1


def line_of(text: str, fragment: str, nth: int = 1) -> int:
    """1-based number of the nth line of `text` that starts with `fragment`."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if line.startswith(fragment)]
    return hits[nth - 1]


def write_png(path: Path) -> None:
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, format="PNG")


def write_random_bytes(path: Path) -> None:
    path.write_bytes(bytes([0x89]) + random.Random(0).randbytes(511))  # 0x89 never starts UTF-8


DUPLICATED = GOOD.replace("    lr: 2.0e-3 ", "    lr: 2.0e-3\n    d_lr: 1.0e-3\n    lr: 9.0e-3 ", 1)
DUPLICATED_TOP = GOOD + "run:\n  dir: runs/other\n"
CONTROL_CHAR = GOOD.replace("  dir: runs/demo\n", "  dir: runs/\x07demo\n", 1)

# (name, how to write bad.yaml, overrides, fragments the one line must hold)
FAULTS = [
    ("empty file", lambda p: p.write_bytes(b""), [], ["bad.yaml is empty", "data, run, ae, diffusion"]),
    ("only comments", lambda p: p.write_text("# a recipe, one day\n\n   \n# still nothing\n"), [], ["bad.yaml is empty"]),
    ("random bytes", write_random_bytes, [], ["bad.yaml is not a text YAML recipe", "0x89 at offset 0", "UTF-8"]),
    ("png", write_png, [], ["bad.yaml is not a text YAML recipe", "not UTF-8"]),
    ("nul bytes in utf-8", lambda p: p.write_bytes(GOOD.encode().replace(b"runs/demo", b"runs/\0demo", 1)), [],
     ["bad.yaml is not a text YAML recipe", "NUL byte"]),
    ("directory", lambda p: p.mkdir(), [], ["bad.yaml is a directory, not a recipe file", "no .yaml file"]),
    ("control character", lambda p: p.write_text(CONTROL_CHAR), [],
     [f"bad.yaml:{line_of(CONTROL_CHAR, '  dir: runs/')}: malformed YAML", "#x0007"]),
    ("int past int64 in yaml", lambda p: p.write_text(GOOD.replace("    batch: 16", "    batch: 99999999999999999999")), [],
     [f"bad.yaml:{line_of(GOOD, '    batch: 16')}", "'ae.train.batch'", "int64", str(INT64_MAX), "99999999999999999999"]),
    ("int past int64 override", lambda p: p.write_text(GOOD), ["ae.train.batch=99999999999999999999"],
     ["override 'ae.train.batch=99999999999999999999'", "'ae.train.batch'", "int64", str(INT64_MAX)]),
    ("int below int64 override", lambda p: p.write_text(GOOD), [f"ae.train.seed={-(2**63) - 1}"],
     ["'ae.train.seed'", "int64", str(-(2**63))]),
    ("int-valued float past int64", lambda p: p.write_text(GOOD), ["ae.train.steps=1.0e+30"], ["'ae.train.steps'", "int64"]),
    ("nan in yaml", lambda p: p.write_text(GOOD.replace("    lr: 2.0e-3 ", "    lr: .nan   ", 1)), [],
     [f"bad.yaml:{line_of(GOOD, '    lr: 2.0e-3')}", "'ae.optim.lr'", "finite", "got nan"]),
    ("nan override", lambda p: p.write_text(GOOD), ["ae.optim.lr=.nan"], ["override 'ae.optim.lr=.nan'", "'ae.optim.lr'", "finite"]),
    ("inf override", lambda p: p.write_text(GOOD), ["ae.optim.lr=.inf"], ["'ae.optim.lr'", "finite", "got inf"]),
    ("-inf override", lambda p: p.write_text(GOOD), ["ae.loss.l2=-.inf"], ["'ae.loss.l2'", "finite", "got -inf"]),
    ("inf as a string", lambda p: p.write_text(GOOD), ["ae.optim.eps=1e999"], ["'ae.optim.eps'", "finite"]),
    ("huge int for a float", lambda p: p.write_text(GOOD), [f"ae.optim.d_lr={10**400}"], ["'ae.optim.d_lr'", "finite"]),
    ("nan for an optional float", lambda p: p.write_text(GOOD), ["ae.optim.grid_lr=.nan"], ["'ae.optim.grid_lr'", "finite"]),
    ("nan inside a list", lambda p: p.write_text(GOOD), ["ae.optim.betas=[0.9, .nan]"], ["'ae.optim.betas[1]'", "finite"]),
    ("duplicate key", lambda p: p.write_text(DUPLICATED), [],
     ["duplicate key 'ae.optim.lr'",
      f"lines {line_of(DUPLICATED, '    lr: ')} and {line_of(DUPLICATED, '    lr: ', 2)}",
      f"bad.yaml:{line_of(DUPLICATED, '    lr: ', 2)}:"]),
    ("duplicate section", lambda p: p.write_text(DUPLICATED_TOP), [],
     ["duplicate key 'run'", f"lines {line_of(GOOD, 'run:')} and {line_of(DUPLICATED_TOP, 'run:', 2)}"]),
]
IDS = [f[0] for f in FAULTS]


@pytest.mark.parametrize("name, write, overrides, fragments", FAULTS, ids=IDS)
def test_ae_train_dry_run_refuses_with_one_line(tmp_path, capsys, monkeypatch, name, write, overrides, fragments):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BRICS_DEBUG", raising=False)
    path = tmp_path / "bad.yaml"
    write(path)
    code, err = run_cli(["ae-train", str(path), "--dry-run", *overrides], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not (tmp_path / "runs").exists()  # refused before any run folder was made


@pytest.mark.parametrize("name, write, overrides, fragments", FAULTS, ids=IDS)
def test_load_recipe_raises_config_error(tmp_path, name, write, overrides, fragments):
    path = tmp_path / "bad.yaml"
    write(path)
    with pytest.raises(ConfigError) as exc_info:
        load_recipe(path, overrides)
    message = str(exc_info.value)
    assert exc_info.value.exit_code == 2 and "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_a_directory_lists_the_recipes_it_holds(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "demo.yaml").write_text(GOOD)
    with pytest.raises(ConfigError, match=r"recipes is a directory, not a recipe file: .*it holds demo\.yaml"):
        load_recipe(tmp_path / "recipes")


def test_the_int64_bound_is_exact():
    assert load_recipe(ROOT / "recipes/demo.yaml", [f"ae.train.seed={INT64_MAX}"]).ae.train.seed == INT64_MAX
    assert load_recipe(ROOT / "recipes/demo.yaml", [f"ae.train.seed={-(2**63)}"]).ae.train.seed == -(2**63)
    with pytest.raises(ConfigError, match="int64"):
        load_recipe(ROOT / "recipes/demo.yaml", [f"ae.train.seed={INT64_MAX + 1}"])


def test_large_finite_floats_and_merge_keys_still_load(tmp_path):
    assert load_recipe(ROOT / "recipes/demo.yaml", ["ae.loss.l2=1.0e+300"]).ae.loss.l2 == 1e300
    # `<<: *anchor` then a key of the same name is YAML's way to override, not a duplicate.
    (tmp_path / "r.yaml").write_text(
        "run:\n  dir: runs/a\nae:\n  train:\n    <<: {steps: 7, batch: 3}\n    batch: 5\n"
    )
    cfg = load_recipe(tmp_path / "r.yaml")
    assert (cfg.ae.train.steps, cfg.ae.train.batch, cfg.run.dir) == (7, 5, "runs/a")


def test_a_utf8_bom_is_not_an_error(tmp_path):
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert load_recipe(tmp_path / "bom.yaml") == load_recipe(ROOT / "recipes/demo.yaml")


def test_a_png_recipe_in_a_real_process_has_no_traceback(tmp_path):
    write_png(tmp_path / "photo.png")
    env = {k: v for k, v in os.environ.items() if k != "BRICS_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "brics_cli", "ae-train", str(tmp_path / "photo.png"), "--dry-run"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'photo.png'} is not a text YAML recipe (byte 0x89 at offset 0 is not UTF-8): "
        "give the path of a UTF-8 .yaml recipe (recipes/demo.yaml is one)"
    ]
