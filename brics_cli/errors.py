"""User-facing errors: one line that names the problem and the fix.

The CLI catches `BricsError` at the top level, prints `error: <message>` on stderr and exits with
`exit_code` (2 for usage/config errors, 1 for runtime errors). `BRICS_DEBUG=1` re-raises instead so
the traceback is visible.
"""

from __future__ import annotations

from dataclasses import dataclass


class BricsError(Exception):
    """Base class of every error meant for the user rather than the developer."""

    exit_code = 1


class ConfigError(BricsError):
    """A recipe, override or flag is wrong: unknown key, bad type, malformed YAML, missing file."""

    exit_code = 2


class RegistryError(BricsError):
    """Unknown registry name, or two modules registering the same name."""

    exit_code = 2


@dataclass(frozen=True)
class Missing:
    """One prerequisite a command lacks: what it is, and the command or file that fixes it."""

    what: str  # e.g. "data.shards: shards/church"
    fix: str

    def line(self) -> str:
        return f"{self.what} -- {self.fix}"


class PrerequisitesMissing(BricsError):
    """Inputs a command needs are not there (exit 2): all of them at once, one line each."""

    exit_code = 2

    def __init__(self, command: str, missing: list[Missing]) -> None:
        self.missing = missing
        if len(missing) == 1:  # one thing missing: one line, as every other error
            super().__init__(f"{command} cannot start: {missing[0].line()}")
            return
        lines = "\n".join(f"  - {m.line()}" for m in missing)
        super().__init__(f"{command} cannot start; {len(missing)} prerequisites missing:\n{lines}")
