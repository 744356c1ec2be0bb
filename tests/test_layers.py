"""The package's structure, read from the code with `ast` (README "Layout").

Rule: brics_cli is a house of floors. A module may import from floors below its own and from its
own room (the same package), never from a floor above it nor from another room on its own floor:

    9  brics_cli.__main__
    8  brics_cli.cli                 the command line: parse, load, call, print
    7  brics_cli.demo                the whole pipeline as subprocesses, and its report
    6  brics_cli.recipe              one YAML file for every stage
    5  brics_cli.train, .infer       training loops; reconstruct and sample with trained models
    4  brics_cli.diffusion, .eval    diffusion math on key codes; metrics
    3  brics_cli.data, .models, .nets   shards and loaders; networks; pretrained networks
    2  brics_cli.config, .runs       typed configs; finding run folders
    1  brics_cli.core, .registry     files, images, checkpoints, runtime, progress; registries
    0  brics_cli (its __init__), brics_cli.errors

Second rule: a CLI command function is thin -- at most 40 lines of body (docstring excluded).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "brics_cli"

FLOORS = [
    ["brics_cli", "brics_cli.errors"],
    ["brics_cli.core", "brics_cli.registry"],
    ["brics_cli.config", "brics_cli.runs"],
    ["brics_cli.data", "brics_cli.models", "brics_cli.nets"],
    ["brics_cli.diffusion", "brics_cli.eval"],
    ["brics_cli.train", "brics_cli.infer"],
    ["brics_cli.recipe"],
    ["brics_cli.demo"],
    ["brics_cli.cli"],
    ["brics_cli.__main__"],
]
MAX_COMMAND_LINES = 40


def room(module: str) -> str:
    """The most specific room of FLOORS that holds `module`."""
    rooms = [r for floor in FLOORS for r in floor if module == r or module.startswith(r + ".")]
    return max(rooms, key=len)


def floor(room_name: str) -> int:
    return next(i for i, rooms in enumerate(FLOORS) if room_name in rooms)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str) -> list[tuple[int, str]]:
    """(line, imported module) for every brics_cli import of a file, wherever it appears."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("brics_cli")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("brics_cli") and node.level == 0:
            for alias in node.names:  # `from brics_cli.nets import weights` imports brics_cli.nets.weights
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").is_file() or (
                    PACKAGE.parent / candidate.replace(".", "/")).is_dir()
                found.append((node.lineno, candidate if is_module else node.module))
    return found


def violations(module: str, source: str) -> list[str]:
    my_room = room(module)
    wrong = []
    for line, target in imports(source):
        their_room = room(target)
        if their_room == my_room or target == "brics_cli" or floor(their_room) < floor(my_room):
            continue
        direction = "up" if floor(their_room) > floor(my_room) else "sideways"
        wrong.append(f"{module}:{line} imports {target} ({direction}: {my_room} -> {their_room})")
    return wrong


def test_no_import_reaches_up_or_sideways():
    wrong = [v for path in sorted(PACKAGE.rglob("*.py")) for v in violations(module_name(path), path.read_text())]
    assert not wrong, "imports against the layering rule:\n" + "\n".join(wrong)


def test_every_module_has_a_room():
    for path in PACKAGE.rglob("*.py"):
        room(module_name(path))  # raises ValueError (max of nothing) for a module outside FLOORS


def _is_command(fn: ast.FunctionDef) -> bool:
    """A typer command: some parameter defaults to typer.Option(...) / typer.Argument(...)."""
    defaults = fn.args.defaults + [d for d in fn.args.kw_defaults if d is not None]
    return any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr in ("Option", "Argument")
               for d in defaults)


def test_cli_command_functions_are_thin():
    fat = []
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and _is_command(node):
                body = node.body
                if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                    body = body[1:]  # the docstring
                lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
                if lines > MAX_COMMAND_LINES:
                    fat.append(f"{path.name}:{node.lineno} {node.name}: {lines} lines")
    assert not fat, f"CLI command functions over {MAX_COMMAND_LINES} lines (move the work below brics_cli.cli):\n" + "\n".join(fat)


def test_the_checker_reports_what_the_rule_forbids():
    up = "from brics_cli.diffusion.schedules import LOGSNR_MAX"  # what models/unet.py once did
    sideways = "def f():\n    from brics_cli.eval import metrics"  # diffusion and eval share a floor
    allowed = "from brics_cli.core.files import sha256_file\nfrom brics_cli.models.grid import GridConfig"
    assert violations("brics_cli.models.unet", up) == [
        "brics_cli.models.unet:1 imports brics_cli.diffusion.schedules (up: brics_cli.models -> brics_cli.diffusion)"]
    assert len(violations("brics_cli.diffusion.loss", sideways)) == 1
    assert violations("brics_cli.models.retrieval", allowed) == []
