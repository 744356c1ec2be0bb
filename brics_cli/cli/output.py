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
    """A `--dry-run` plan, one `key: value` per line, keys right-aligned."""
    for key, value in plan.items():
        if key != "dry_run":
            print(f"{key:>{width}}: {value}")
