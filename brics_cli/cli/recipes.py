"""`brics recipes list|show`: the packaged presets, by name, wherever brics is installed."""

from __future__ import annotations

from typing import List, Optional

import typer

from brics_cli.cli.output import emit_json

app = typer.Typer(help="The packaged recipes (presets): list them, print one to copy and edit.", no_args_is_help=True)


@app.command("list")
def list_recipes(json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout.")) -> None:
    """List the presets that every command taking a recipe accepts by name (e.g. `brics info church`)."""
    from brics_cli.recipe import describe_preset, presets

    report = {name: {"file": str(path), "description": describe_preset(path)} for name, path in presets().items()}
    if json_output:
        emit_json(report)
        return
    for name, entry in report.items():
        print(f"{name:<8} {entry['description']}")


@app.command("show")
def show_recipe(
    name: str = typer.Argument(..., help="A preset name (church, demo, ffhq, webvid) or a recipe file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Overrides `section.key=value`, applied before printing."),
) -> None:
    """Print the resolved recipe -- every key with its value, defaults included -- as YAML to copy and edit."""
    import yaml

    from brics_cli.config import to_dict
    from brics_cli.recipe import load_recipe, resolve_recipe

    print(f"# brics recipes show {name}: {resolve_recipe(name)}, resolved")
    print(yaml.safe_dump(to_dict(load_recipe(name, overrides or [])), sort_keys=False), end="")
