"""User-facing errors: one line that names the problem and the fix.

The CLI catches `BricsError` at the top level, prints `error: <message>` on stderr and exits with
`exit_code` (2 for usage/config errors, 1 for runtime errors). `BRICS_DEBUG=1` re-raises instead so
the traceback is visible.
"""

from __future__ import annotations


class BricsError(Exception):
    """Base class of every error meant for the user rather than the developer."""

    exit_code = 1


class ConfigError(BricsError):
    """A recipe, override or flag is wrong: unknown key, bad type, malformed YAML, missing file."""

    exit_code = 2


class RegistryError(BricsError):
    """Unknown registry name, or two modules registering the same name."""

    exit_code = 2
