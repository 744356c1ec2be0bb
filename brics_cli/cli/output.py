"""Shared output conventions: `--json` prints one JSON object as the last line of stdout."""

from __future__ import annotations

import json
import sys
from typing import Any


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def human_count(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def print_plan(plan: dict, width: int) -> None:
    """A `--dry-run` plan, one `key: value` per line, keys right-aligned; then what is missing."""
    for key, value in plan.items():
        if key not in ("dry_run", "missing"):
            print(f"{key:>{width}}: {value}")
    for item in plan.get("missing", []):
        print(f"{'missing':>{width}}: {item['what']} -- {item['fix']}")


def finish_plan(plan: dict, json_output: bool, width: int) -> None:
    """Print a `--dry-run` plan (JSON or text); exit 2 when a prerequisite is missing, as the real run would."""
    import typer

    if json_output:
        emit_json(plan)
    else:
        print_plan(plan, width)
    if plan.get("missing"):
        raise typer.Exit(2)


def renamed(new: Any, old: Any, new_flag: str, old_flag: str) -> Any:
    """The value of a renamed flag: the new spelling's, or the old (hidden) spelling's with a warning.
    The old names go in the next release (CHANGELOG 2026-12-02); giving both is a usage error."""
    if old is None:
        return new
    if new is not None:
        from brics_cli.errors import ConfigError

        raise ConfigError(f"{old_flag} is the old name of {new_flag}: give {new_flag} only")
    print(f"warning: {old_flag} is deprecated and goes in the next release; use {new_flag}", file=sys.stderr)
    return old


def required(value: Any, flag: str) -> Any:
    """A required flag that has a hidden old spelling (so typer cannot require it itself)."""
    if value is None:
        from brics_cli.errors import ConfigError

        raise ConfigError(f"missing option {flag}")
    return value
