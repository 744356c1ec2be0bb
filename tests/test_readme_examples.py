"""The README's printed examples are what the code prints (at 80 columns, as a terminal shows them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_output(command: str) -> str:
    """The lines after `$ COMMAND` in the README's console block, up to the next `$` line or the block's end."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(f"$ {command}") + 1
    out = []
    for line in lines[start:]:
        if line.startswith("$ ") or line.startswith("```"):
            break
        out.append(line.rstrip())
    return "\n".join(out)


@pytest.mark.parametrize("command, env", [
    ("brics info recipes/church.yaml", {}),
    ("brics plugins list", {"BRICS_LOAD_PLUGINS": ""}),  # brics' own entries only: what a plain install shows
])
def test_readme_example_matches_the_output(command, env):
    args = command.split()[1:]
    run = subprocess.run([sys.executable, "-m", "brics_cli", *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "COLUMNS": "80", "TERM": "dumb", **env})
    assert run.returncode == 0, run.stderr
    printed = "\n".join(line.rstrip() for line in run.stdout.splitlines())
    assert printed == readme_output(command)
