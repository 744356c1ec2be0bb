"""`brics plugins list`: every registry with its names, module and distribution."""

from __future__ import annotations

import typer

from brics_cli.cli.output import emit_json

app = typer.Typer(help="Inspect the registries and the plugins that fill them.", no_args_is_help=True)


@app.command("list")
def list_plugins(json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout.")) -> None:
    """List every registry entry: built-ins and third-party plugins (entry points `brics.<registry>`)."""
    from brics_cli.registry import ALL_REGISTRIES

    report = {
        name: [
            {"name": e.name, "module": e.module, "distribution": e.distribution, "version": e.version}
            for e in registry.entries()
        ]
        for name, registry in ALL_REGISTRIES.items()
    }
    if json_output:
        emit_json(report)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="brics registries")
    for column in ("registry", "name", "module", "distribution"):
        table.add_column(column)
    for registry, entries in report.items():
        for e in entries:
            dist = f"{e['distribution']} {e['version']}" if e["distribution"] else "-"
            table.add_row(registry, e["name"], e["module"], dist)
    Console().print(table)
