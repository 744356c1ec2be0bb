"""What every benchmark script ends with: print its JSON report and, with --out, write it."""

from __future__ import annotations

import json
from pathlib import Path


def emit(report: dict, out: Path | None) -> None:
    """Print `report` as indented JSON on stdout; also write it to `out` (parents created) when given."""
    text = json.dumps(report, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
