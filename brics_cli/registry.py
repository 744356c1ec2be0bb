"""Registries: short names -> classes/functions, filled by decorators and Python entry points.

Built-in entries and third-party plugins take the same path: every entry is advertised as an entry
point in the group `brics.<registry>` (brics' own in its pyproject.toml), and a registry imports
those modules the first time someone looks a name up or lists it. Importing a module runs the
`@REGISTRY.register("name")` decorator declared right above the class, which records it.

A name registered twice by different modules is a hard error naming both (as in mmengine); an unknown
name is an error that lists what exists and the closest match.

This module does not import torch: `brics --help` stays instant.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Generic, Iterator, TypeVar

from brics_cli.errors import RegistryError

T = TypeVar("T")


@dataclass
class Entry:
    name: str
    obj: Any
    module: str
    distribution: str | None = None
    version: str | None = None


def closest(name: str, options: list[str]) -> str | None:
    """The most similar option to `name`, or None when nothing is close."""
    matches = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return matches[0] if matches else None


class Registry(Generic[T]):
    """A name -> object table for one kind of component (decoders, retrieval functions, ...)."""

    def __init__(self, name: str, group: str | None = None) -> None:
        self.name = name
        self.group = group or f"brics.{name}"
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@DECODERS.register("stylegan")` above the class."""

        def decorator(obj: T) -> T:
            self._add(name, obj, getattr(obj, "__module__", "?"))
            return obj

        return decorator

    def _add(self, name: str, obj: Any, module: str) -> Entry:
        existing = self._entries.get(name)
        if existing is not None:
            same = existing.module == module and getattr(existing.obj, "__qualname__", None) == getattr(
                obj, "__qualname__", object()
            )
            if not same:
                raise RegistryError(
                    f"{self.name} name '{name}' is registered twice: by {existing.module}"
                    f"{_dist_suffix(existing)} and by {module}; rename one of them"
                )
            existing.obj = obj  # re-import of the same module (e.g. importlib.reload)
            return existing
        entry = Entry(name, obj, module)
        self._entries[name] = entry
        return entry

    def load_plugins(self) -> None:
        """Import every module advertised in this registry's entry-point group (once)."""
        if self._loaded:
            return
        self._loaded = True
        allowed = external_plugins_allowed()
        for ep in sorted(metadata.entry_points(group=self.group), key=lambda e: (e.name, e.value)):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if dist != "brics" and allowed is not None and dist not in allowed and ep.name not in allowed:
                continue  # an external plugin left out by BRICS_LOAD_PLUGINS
            existing = self._entries.get(ep.name)
            if existing is not None and existing.module != ep.module:
                raise RegistryError(
                    f"{self.name} name '{ep.name}' is registered twice: by {existing.module}"
                    f"{_dist_suffix(existing)} and by {ep.module} (distribution {dist}); "
                    f"uninstall or rename one of them"
                )
            try:
                obj = ep.load()
            except RegistryError:
                raise
            except Exception as exc:  # a broken plugin must not take the whole CLI down silently
                raise RegistryError(
                    f"could not load {self.name} plugin '{ep.name}' from {ep.value} "
                    f"(distribution {dist}): {type(exc).__name__}: {exc}"
                ) from exc
            entry = self._entries.get(ep.name)
            if entry is None:
                if ep.attr is None:
                    raise RegistryError(
                        f"{self.name} entry point '{ep.name}' ({ep.value}, distribution {dist}) imported "
                        f"but registered nothing under that name"
                    )
                entry = self._add(ep.name, obj, ep.module)
            entry.distribution, entry.version = dist, version

    def get(self, name: str) -> T:
        self.load_plugins()
        if name not in self._entries:
            names = sorted(self._entries)
            hint = closest(name, names)
            suggestion = f"; did you mean '{hint}'?" if hint else ""
            available = ", ".join(names) if names else "none (is brics installed? run `pip install -e .`)"
            raise RegistryError(f"unknown {self.name[:-1]} '{name}'; available: {available}{suggestion}")
        return self._entries[name].obj

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry]:
        self.load_plugins()
        for name in sorted(self._entries):
            yield self._entries[name]

    def __contains__(self, name: str) -> bool:
        self.load_plugins()
        return name in self._entries


def external_plugins_allowed() -> set[str] | None:
    """BRICS_LOAD_PLUGINS: unset = every installed plugin; a comma list of distribution or entry
    names = only those; empty = none (brics' own entries always load)."""
    value = os.environ.get("BRICS_LOAD_PLUGINS")
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _dist_suffix(entry: Entry) -> str:
    return f" (distribution {entry.distribution})" if entry.distribution else ""


DECODERS: Registry = Registry("decoders")
RETRIEVALS: Registry = Registry("retrievals")
SOURCES: Registry = Registry("sources")
SCHEDULES: Registry = Registry("schedules")  # diffusion noise schedules (brics_cli/diffusion/schedules.py)
SAMPLERS: Registry = Registry("samplers")  # diffusion samplers, one shared signature (brics_cli/diffusion/samplers.py)

ALL_REGISTRIES: dict[str, Registry] = {
    r.name: r for r in (DECODERS, RETRIEVALS, SCHEDULES, SAMPLERS, SOURCES)
}
