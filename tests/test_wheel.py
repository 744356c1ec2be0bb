"""The built wheel, installed into a fresh virtual environment and run from outside the checkout:
the presets ship inside it, so `brics info church` and the demo's recipe work without a clone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_presets_and_runs_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(dist.glob("brics-*.whl"))
    assert {f"brics_cli/recipes/{n}.yaml" for n in ("church", "demo", "ffhq", "webvid")} | {"brics_cli/paper_rows.yaml"} <= set(
        zipfile.ZipFile(wheel).namelist())
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    # brics itself comes from the wheel; its dependencies (torch & co.) from this test environment,
    # appended after the new venv's own site-packages (a path in a .pth file: its .pth files, the
    # editable install of the checkout among them, are not run).
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    # The plugin distributions installed (editable) here are seen through that path but not importable
    # from it; the fresh environment is brics alone.
    env = {**os.environ, "BRICS_LOAD_PLUGINS": ""}

    def brics(*args: str) -> dict:
        proc = subprocess.run([str(venv / "bin" / "brics"), *args], capture_output=True, text=True, cwd=work, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.splitlines()[-1])

    where = subprocess.run([str(python), "-c", "import brics_cli, brics_cli.demo as d; print(brics_cli.__file__, d.RECIPE.is_file())"],
                           capture_output=True, text=True, cwd=work, env=env, check=True).stdout.split()
    assert where[0].startswith(str(site)) and where[1] == "True"  # the installed package, with the demo's recipe
    listed = brics("recipes", "list", "--json")
    presets = listed["presets"]
    assert set(presets) == {"church", "demo", "ffhq", "webvid"} and all(Path(v["file"]).is_relative_to(site) for v in presets.values())
    assert "ffhq-16x16x8" in listed["rows"]  # the paper's rows ship too
    info = brics("info", "church", "--json")
    assert info["recipe"] == "church" and round(info["components"]["grids"]["params"] / 1e6, 1) == 18.6  # Table 3
    assert info["paper"]["grid_params"] == 18_600_000
    row = brics("info", "ffhq-16x16x8", "--json")
    assert round(row["components"]["grids"]["params"] / 1e6, 1) == 21.2
    brics("shard", "demo", "--out", "shards/demo", "--resolution", "32", "--train-count", "8", "--val-count", "4", "--json")
    plan = brics("ae-train", "demo", "--dry-run", "--json", "data.shards=shards/demo", f"run.dir={work / 'runs'}")
    assert plan["dry_run"] is True and plan["steps"] > 0 and plan["missing"] == []
