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
from typing import Any, Callable, Literal, TypeVar, Union

import yaml

from brics_cli.errors import BricsError, ConfigError
from brics_cli.registry import closest

T = TypeVar("T")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # integer fields end up in torch / numpy int64

# Keys that moved: a recipe or override that still writes the old name is told the new one.
RENAMED_KEYS: dict[str, tuple[str, str]] = {  # old dotted key -> (new dotted key, why)
    "diffusion.optim.batch": ("diffusion.train.batch", "the global batch, like ae.train.batch"),
}


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


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that records the line of every key and refuses a key written twice.

    Plain PyYAML keeps the last of two equal keys in a mapping, so a pasted `lr:` silently wins.
    """

    def __init__(self, text: str, origins: _Origins) -> None:
        super().__init__(text)
        self.origins = origins
        self.paths: dict[int, str] = {}  # id(mapping node) -> its dotted key

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Children are built after their parent (PyYAML constructs lazily), so paths are set first.
        prefix = self.paths.get(id(node), "")
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may repeat keys on purpose
                continue
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            line = key_node.start_mark.line + 1
            if path in first_line:
                raise ConfigError(
                    f"{self.origins.source}:{line}: duplicate key '{path}', written at lines "
                    f"{first_line[path]} and {line}: keep one of them"
                )
            first_line[path] = line
            self.origins.where[path] = f"{self.origins.source}:{line}"
            self.paths[id(value_node)] = path
        return super().construct_mapping(node, deep)


def _read_text(path: Path) -> str:
    """The recipe's text; a directory or a binary file is named as such, not 'not found' or a traceback."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.yaml"))[:5]
        holds = f"it holds {', '.join(inside)}" if inside else "it holds no .yaml file"
        raise ConfigError(f"{path} is a directory, not a recipe file: give the path of a .yaml recipe ({holds})")
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    raw = path.read_bytes()
    not_text = f"{path} is not a text YAML recipe"
    fix = "give the path of a UTF-8 .yaml recipe (recipes/demo.yaml is one)"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{not_text} (byte 0x{raw[exc.start]:02x} at offset {exc.start} is not UTF-8): {fix}") from None
    nul = raw.find(b"\0")
    if nul >= 0:  # valid UTF-8 may hold NULs; no text recipe does
        raise ConfigError(f"{not_text} (it holds a NUL byte at offset {nul}): {fix}")
    return text


def _load_yaml(text: str, origins: _Origins) -> Any:
    """The one YAML document in `text` (None if there is none), recording where each key was written."""
    loader = _RecipeLoader(text, origins)  # the reader refuses control characters right here
    try:
        node = loader.get_single_node()
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_error_line(exc: yaml.YAMLError, text: str) -> str:
    """':LINE' where PyYAML says where it stopped, else ''."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return f":{mark.line + 1}"
    position = getattr(exc, "position", None)  # a ReaderError (a control character) has no mark
    if position is None:
        return ""
    line = text.count("\n", 0, position) + 1
    return f":{line}"


def _parse_yaml(path: Path, origins: _Origins, sections: list[str]) -> dict[str, Any]:
    text = _read_text(path)
    try:
        data = _load_yaml(text, origins)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{_yaml_error_line(exc, text)}: malformed YAML: {problem}") from exc
    if data is None:
        # An empty file is more often a torn copy or the wrong path than a wish for "all defaults".
        raise ConfigError(
            f"recipe {path} is empty: write at least one section ({', '.join(sections)}); "
            "recipes/demo.yaml is a complete example"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections ({', '.join(sections)}, ...), got {type(data).__name__}")
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


def _finite_float(value: Any, bad: Callable[[str], ConfigError]) -> float:
    """A float field's value: any number or float literal, but never nan, inf or -inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad("a number")
    try:
        # PyYAML (YAML 1.1) reads '1e-15' as a string: accept any float literal here.
        number = float(value)
    except ValueError:
        raise bad("a number") from None
    except OverflowError:  # an int beyond 1.8e308
        number = math.inf
    if not math.isfinite(number):  # a nan learning rate or an inf weight poisons the run, not the config
        raise bad("a finite number (nan, inf and -inf are refused)")
    return number


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
        if len(errors) == 1:  # `float | None` and the like: the one candidate says what is wrong
            raise errors[0]
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
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
        if not INT64_MIN <= value <= INT64_MAX:  # torch and numpy overflow past int64, far from here
            raise bad(f"an integer that fits in int64 ({INT64_MIN} .. {INT64_MAX})")
        return value
    if tp is float:
        return _finite_float(value, bad)
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
            if dotted in RENAMED_KEYS:
                renamed, why = RENAMED_KEYS[dotted]
                raise ConfigError(f"{origins.of(dotted)}: {dotted} is now {renamed} ({why})")
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
    data = _parse_yaml(path, origins, [f.name for f in dataclasses.fields(cls)])
    for text in overrides:
        key, value = parse_override(text)
        origin = f"override '{text}'"
        parts = key.split(".")
        for i in range(1, len(parts)):  # sections the override creates belong to it too
            origins.where.setdefault(".".join(parts[:i]), origin)
        origins.where[key] = origin
        _set_dotted(data, key, value, origin)
    return build(cls, data, "", origins)


def move_renamed_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a stored whole-recipe config (an older checkpoint's `config`) with the keys of
    `RENAMED_KEYS` moved to their new names, so `build` reads it; where both are there the new one wins."""

    def copy(value: Any) -> Any:
        return {k: copy(v) for k, v in value.items()} if isinstance(value, dict) else value

    tree = copy(tree)
    for old, (new, _why) in RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        node: Any = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        *new_parents, new_leaf = new.split(".")
        target = tree
        for part in new_parents:
            target = target.setdefault(part, {})
        target.setdefault(new_leaf, value)
    return tree


def to_dict(cfg: Any) -> dict[str, Any]:
    """A resolved config as plain YAML/JSON-friendly data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))
