"""Registries: decorators, entry-point plugins from a real (temporary) distribution, hard errors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from brics_cli.errors import RegistryError
from brics_cli.registry import DECODERS, RETRIEVALS, Registry


def test_builtins_come_through_entry_points_with_their_distribution():
    entries = {e.name: e for e in DECODERS.entries()}
    assert entries["stylegan"].module == "brics_cli.models.decoder"
    assert entries["stylegan"].distribution == "brics"
    assert {e.name for e in RETRIEVALS.entries()} >= {"grid", "hash"}
    assert all(e.distribution == "brics" for e in RETRIEVALS.entries())


def test_unknown_name_lists_available_and_closest():
    with pytest.raises(RegistryError) as info:
        DECODERS.get("styelgan")
    message = str(info.value)
    assert "stylegan" in message and "did you mean 'stylegan'" in message


def test_duplicate_name_from_another_module_is_a_hard_error_naming_both():
    registry = Registry("widgets", group="brics.test-widgets-none")

    @registry.register("a")
    class First:
        pass

    Second = type("Second", (), {"__module__": "other.module"})
    with pytest.raises(RegistryError) as info:
        registry.register("a")(Second)
    assert First.__module__ in str(info.value) and "other.module" in str(info.value)


def _fake_distribution(root, dist_name, module, entry_name, body):
    """Write an importable module plus a .dist-info with entry points: a real installed distribution."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist_name.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[brics.decoders]\n{entry_name} = {module}:Decoder\n")


PLUGIN = """
from dataclasses import dataclass
from brics_cli.registry import DECODERS

@dataclass
class DecoderConfig:
    name: str = "{name}"

@DECODERS.register("{name}")
class Decoder:
    Config = DecoderConfig
"""


def _run_plugins_list(path, **extra_env):
    env = {**os.environ, "PYTHONPATH": str(path), **extra_env}
    env.pop("BRICS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "brics_cli", "plugins", "list", "--json"], capture_output=True, text=True, env=env)


def test_third_party_plugin_is_found_through_its_entry_point(tmp_path):
    _fake_distribution(tmp_path, "brics-toy", "brics_toy_decoder", "toy", PLUGIN.format(name="toy"))
    proc = _run_plugins_list(tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    toy = [e for e in report["decoders"] if e["name"] == "toy"]
    assert toy == [{"name": "toy", "module": "brics_toy_decoder", "distribution": "brics-toy", "version": "0.3"}]
    assert {"name", "module", "distribution", "version"} <= set(report["retrievals"][0])


def test_plugin_reusing_a_builtin_name_is_a_hard_error(tmp_path):
    _fake_distribution(tmp_path, "brics-clash", "brics_clash_decoder", "stylegan", PLUGIN.format(name="stylegan"))
    proc = _run_plugins_list(tmp_path)
    assert proc.returncode == 2
    assert "brics_cli.models.decoder" in proc.stderr and "brics_clash_decoder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_brics_load_plugins_selects_external_plugins(tmp_path):
    _fake_distribution(tmp_path, "brics-toy", "brics_toy_decoder", "toy", PLUGIN.format(name="toy"))

    def decoders(**env):
        proc = _run_plugins_list(tmp_path, **env)
        assert proc.returncode == 0, proc.stderr
        return {e["name"] for e in json.loads(proc.stdout.strip().splitlines()[-1])["decoders"]}

    assert "toy" not in decoders(BRICS_LOAD_PLUGINS="")
    assert "stylegan" in decoders(BRICS_LOAD_PLUGINS="")  # built-ins always load
    assert "toy" in decoders(BRICS_LOAD_PLUGINS="brics-toy")
    assert "toy" in decoders(BRICS_LOAD_PLUGINS="something-else, toy")
    # A clashing plugin that is not loaded cannot break the CLI either.
    _fake_distribution(tmp_path, "brics-clash", "brics_clash_decoder", "stylegan", PLUGIN.format(name="stylegan"))
    assert _run_plugins_list(tmp_path, BRICS_LOAD_PLUGINS="brics-toy").returncode == 0
