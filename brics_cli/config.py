"""YAML recipes -> typed dataclasses, with `a.b=value` overrides. Strict: never a plain-dict merge.

Each component declares its own config dataclass next to its code (`GridConfig` in
`models/grid.py`, ...). `load_recipe` reads a YAML file, applies command-line overrides and builds
the nested dataclasses, checking every key and every type on the way. Errors name the dotted key,
the file (and line) or the override it came from, and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from brics_cli.errors import BricsError, ConfigError
from brics_cli.registry import closest

T = TypeVar("T")


class _Origins:
    """Where each dotted key came from: 'file.yaml:LINE' or "override 'a.b=c'"."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.where: dict[str, str] = {}

    def of(self, path: str) -> str:
        # The closest recorded ancestor tells where a bad key was written.
        while path:
            if path in self.where:
                return self.where[path]
            path = path.rpartition(".")[0]
        return self.source


def _record_lines(node: yaml.Node, prefix: str, origins: _Origins) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            origins.where[path] = f"{origins.source}:{key_node.start_mark.line + 1}"
            _record_lines(value_node, path, origins)


def _parse_yaml(path: Path, origins: _Origins) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections (data, run, ae, ...), got {type(data).__name__}")
    if node is not None:
        _record_lines(node, "", origins)
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """'ae.grid.levels=8' -> ('ae.grid.levels', 8); the value is read as YAML ('[1, 2]', 'null', ...)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. ae.grid.levels=8)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML") from exc
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any, origin: str) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: '{key}' goes inside '{part}', which is a value, not a section")
        node = child
    node[parts[-1]] = value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, origins: _Origins) -> Any:
    """Check `value` against the annotation `tp` and convert it (dicts -> dataclasses)."""
    where = origins.of(path)

    def bad(expected: str | None = None) -> ConfigError:
        return ConfigError(
            f"{where}: '{path}' must be {expected or _type_name(tp)}, got {value!r} ({type(value).__name__})"
        )

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad("a section (mapping)")
        return build(tp, value, path, origins)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, origins)
            except ConfigError as exc:
                errors.append(exc)
        raise bad()
    if origin is Literal:
        options = typing.get_args(tp)
        if value in options:
            return value
        hint = closest(str(value), [str(o) for o in options])
        suggestion = f"; did you mean '{hint}'?" if hint else ""
        raise ConfigError(
            f"{where}: '{path}' must be one of {', '.join(map(str, options))}, got {value!r}{suggestion}"
        )
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad(f"a list of {len(args)} values")
            items = [_convert(v, a, f"{path}[{i}]", origins) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{path}[{i}]", origins) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads '1e-15' as a string: accept any float literal here.
            try:
                number = float(value)
            except ValueError:
                raise bad("a number") from None
            if math.isfinite(number):
                return number
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    raise TypeError(f"config field {path} has an unsupported annotation {tp!r}")  # a bug, not user input


def _registry_of(cls: type, key: str):
    """The Registry a field selects from (`field(metadata={"registry": DECODERS})`), if any."""
    for f in dataclasses.fields(cls):
        if f.name == key:
            return f.metadata.get("registry")
    return None


def _build_registered(registry, value: Any, path: str, origins: _Origins) -> Any:
    """A section `{name: NAME, ...options}` whose options are the registered class's `Config`."""
    if not isinstance(value, dict):
        raise ConfigError(f"{origins.of(path)}: '{path}' must be a section with a 'name' key")
    name = value.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{origins.of(path)}: '{path}.name' must name one of the {registry.name}")
    try:
        config_cls = registry.get(name).Config
    except BricsError as exc:
        raise ConfigError(f"{origins.of(path + '.name')}: '{path}.name': {exc}") from exc
    if origins.of(f"{path}.name").startswith("override"):
        # `ae.decoder.name=vqgan` switches components in one override: options the recipe file wrote
        # for the previous one are dropped; options given as overrides must fit the new one.
        fields = {f.name for f in dataclasses.fields(config_cls)}
        value = {k: v for k, v in value.items() if k in fields or origins.of(f"{path}.{k}").startswith("override")}
    return build(config_cls, value, path, origins)


def build(cls: type[T], data: dict[str, Any], path: str = "", origins: _Origins | None = None) -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    origins = origins or _Origins("<dict>")
    fields = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            hint = closest(str(key), list(fields))
            suggestion = f"; did you mean '{(path + '.') if path else ''}{hint}'?" if hint else ""
            valid = ", ".join(fields)
            raise ConfigError(
                f"{origins.of(dotted)}: unknown key '{dotted}'{suggestion} (valid here: {valid})"
            )
        registry = _registry_of(cls, key)
        if registry is not None:
            kwargs[key] = _build_registered(registry, value, dotted, origins)
        else:
            kwargs[key] = _convert(value, fields[key], dotted, origins)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field without a default is missing
        raise ConfigError(f"{origins.of(path)}: section '{path or '<root>'}' is incomplete: {exc}") from exc
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except (ValueError, BricsError) as exc:
            raise ConfigError(f"{origins.of(path)}: {exc}") from exc
    return obj


def load_config(cls: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read YAML `path`, apply `key=value` overrides, build and validate `cls`."""
    path = Path(path)
    origins = _Origins(str(path))
    data = _parse_yaml(path, origins)
    for text in overrides:
        key, value = parse_override(text)
        origin = f"override '{text}'"
        parts = key.split(".")
        for i in range(1, len(parts)):  # sections the override creates belong to it too
            origins.where.setdefault(".".join(parts[:i]), origin)
        origins.where[key] = origin
        _set_dotted(data, key, value, origin)
    return build(cls, data, "", origins)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A resolved config as plain YAML/JSON-friendly data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))
