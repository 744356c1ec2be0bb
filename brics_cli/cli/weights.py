"""`brics weights status|path|fetch`: the pretrained files commands may need, offline first."""

from __future__ import annotations

from typing import List, Optional

import typer

from brics_cli.cli.output import emit_json

app = typer.Typer(help="Pretrained weight files: where each belongs, whether it is there and intact.", no_args_is_help=True)


@app.command("status")
def weights_status(
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check sha256 of present files (reads them once)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Every pretrained file any command may need: where it is expected, whether it is present, its sha256 (the
    file's own where present) and whether that is the published one, and which commands need it. Honours
    BRICS_WEIGHTS_DIR, TORCH_HOME and XDG_CACHE_HOME."""
    from brics_cli.nets.weights import status

    rows = status(verify=verify)
    if json_output:
        emit_json({"weights": rows})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pretrained weight files")
    for column in ("name", "file", "state", "sha256", "where", "needed by"):
        table.add_column(column, overflow="fold")
    for r in rows:
        if not r["present"]:
            state = "[red]missing[/]"
        elif r["sha256"] is None and r["actual_sha256"]:
            state = "present, no published sha256"
        elif r["sha256_ok"] is None:
            state = "present"
        else:
            state = "[green]ok[/]" if r["sha256_ok"] else "[yellow]checksum differs[/]"
        sha = r["actual_sha256"] or r["sha256"] or "not published"  # the file's own where present, else the published one
        table.add_row(r["name"], r["file"], state, sha[:16], r["path"] or r["expected_dir"] + "/", ", ".join(r["used_by"]))
    Console().print(table)


@app.command("path")
def weights_path(
    name: Optional[str] = typer.Argument(None, help="A name from `brics weights status` (default: all)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Where a file is (or, when missing, exactly where to put it): one `NAME PATH` line per file."""
    from brics_cli.errors import ConfigError
    from brics_cli.nets import weights

    if name is not None and name not in weights.CATALOGUE:
        raise ConfigError(f"unknown weight file '{name}'; known: {', '.join(weights.CATALOGUE)}")
    names = [name] if name else list(weights.CATALOGUE)
    paths = {n: weights.locate(n) or weights.candidates(n)[0] for n in names}
    if json_output:
        emit_json({n: {"path": str(p), "present": p.is_file()} for n, p in paths.items()})
        return
    for n, p in paths.items():
        print(f"{n} {p}" if name is None else p)


@app.command("fetch")
def weights_fetch(
    names: Optional[List[str]] = typer.Argument(None, help="Files to download (default: every missing downloadable file)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Download files to where they belong (BRICS_WEIGHTS_DIR or the library's place), verifying sha256.
    Only for machines with internet; every other command only reads local files."""
    from brics_cli.core.progress import Progress
    from brics_cli.errors import ConfigError
    from brics_cli.nets import weights

    unknown = [n for n in names or [] if n not in weights.CATALOGUE]
    if unknown:
        raise ConfigError(f"unknown weight file(s) {', '.join(unknown)}; known: {', '.join(weights.CATALOGUE)}")
    todo = names or [n for n, w in weights.CATALOGUE.items() if w.home != "lpips-wheel" and weights.locate(n) is None]
    fetched = {}
    with Progress(transient=True) as progress:
        for n in todo:
            fetched[n] = str(weights.fetch(n, progress.lazy(n, unit="B")))
    if json_output:
        emit_json({"fetched": fetched})
    else:
        print("\n".join(f"{n} -> {p}" for n, p in fetched.items()) or "nothing to fetch: every downloadable file is present")
