"""The command line: help for every command, documented in the README, fast startup, `brics info` numbers."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from brics_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _command_paths(group, prefix=()):
    for name, command in group.commands.items():
        path = (*prefix, name)
        if hasattr(command, "commands"):  # a command group
            yield from _command_paths(command, path)
        else:
            yield path


COMMANDS = sorted(_command_paths(typer.main.get_command(app)))


def test_there_are_commands():
    assert ("info",) in COMMANDS and ("plugins", "list") in COMMANDS


def test_help_lists_the_commands_in_pipeline_order():
    group = typer.main.get_command(app)
    listed = group.list_commands(None)
    assert listed[:5] == ["shard", "ae-train", "reconstruct", "diffusion-train", "sample"] and set(listed) == set(group.commands)
    out = runner.invoke(app, ["--help"], env={"COLUMNS": "80"}).output
    assert out.index("shard ") < out.index("ae-train") < out.index("sample ") < out.index("eval ") < out.index("info ")


def _help_texts(group, prefix=()):
    for name, command in group.commands.items():
        if command.help:
            yield (*prefix, name), command.help
        if hasattr(command, "commands"):
            yield from _help_texts(command, (*prefix, name))


def test_help_texts_are_paragraphs_not_hard_wrapped_lines():
    # A docstring's line breaks would break sentences mid-line at any terminal width but the source's.
    broken = [path for path, text in _help_texts(typer.main.get_command(app))
              if any("\n" in paragraph for paragraph in text.split("\n\n"))]
    assert not broken, broken


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_has_help_and_a_readme_example(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"^\s*\$?\s*brics {' '.join(path)}\b", readme, re.M), f"no README example of brics {' '.join(path)}"


def test_help_does_not_import_torch_and_is_quick():
    code = "import sys, brics_cli.cli; assert 'torch' not in sys.modules, 'torch imported by the CLI module'"
    subprocess.run([sys.executable, "-c", code], check=True)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "brics_cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "info" in proc.stdout
    assert not re.search(r"\|\s+torch$", proc.stderr, re.M)


def test_version():
    from brics_cli import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def _info_json(*args):
    result = subprocess.run([sys.executable, "-m", "brics_cli", "info", *args, "--json"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_info_church_matches_table3_and_suppl_b():
    report = _info_json("recipes/church.yaml")
    c = report["components"]
    assert report["resolution"] == 256
    assert abs(c["grids"]["params"] - 18.63e6) / 18.63e6 < 0.01  # Table 3: 18.6M
    assert 9.0e6 <= c["decoder"]["params"] <= 10.5e6  # Table 3: 9.9M
    assert c["retrieval"]["macs"] <= 0.5e9  # Suppl. B: 0.27 GMAC
    assert report["decode"]["macs"] <= 68e9  # the authors' decoder counts ~67.7 GMAC
    # The paper's claim: about half of VQGAN's f16 decoder (125.3 GMAC with torch.utils.flop_counter).
    assert report["decode"]["macs"] / 125.3e9 < 0.55
    for name in ("encoder", "grids", "retrieval", "decoder", "discriminator"):
        assert isinstance(c[name]["params"], int) and isinstance(c[name]["macs"], int)
    assert report["decode"]["params"] == sum(c[n]["params"] for n in ("grids", "retrieval", "decoder"))


def test_info_override_changes_the_model():
    report = _info_json("recipes/church.yaml", "ae.grid.levels=8")
    assert report["grid"]["levels"] == 8
    assert report["components"]["grids"]["params"] < 18.63e6


def test_info_memory_reports_a_measured_peak():
    report = _info_json("recipes/demo.yaml", "--memory")
    m = report["memory"]["retrieval_training_step"]
    assert m["static_bytes"] == report["components"]["grids"]["params"] * 4 + report["components"]["retrieval"]["params"] * 4
    # The step holds at least the table gradient (same size as the tables) at its peak.
    assert m["step_peak_bytes"] >= report["components"]["grids"]["params"] * 4


def test_live_bytes_counts_allocations_not_views_of_existing_tensors():
    import torch

    from brics_cli.models.summary import _LiveBytes

    mib = 1 << 20
    param = torch.nn.Parameter(torch.zeros(mib // 4))  # 1 MiB, allocated before the measurement
    tracker = _LiveBytes()
    with tracker:
        view = param.view(512, 512)  # a view of existing storage: no new bytes
        grad = torch.zeros_like(param)  # 1 MiB
        grad.index_add_(0, torch.arange(8), torch.ones(8))  # in place: no new storage (+ 96 B of inputs)
        doubled = view * 2  # 1 MiB
        del doubled
        flat = grad.reshape(-1)  # view
    assert 2 * mib <= tracker.peak <= 2 * mib + 256
    assert flat.data_ptr() == grad.data_ptr()
