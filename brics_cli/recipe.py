"""A recipe: the whole pipeline for one dataset in one YAML file (DESIGN.md section 1).

Sections: `data` (brics_cli/data/config.py), `run` (below), `ae` (the autoencoder model of
brics_cli/models/autoencoder.py plus its loss and optimiser), `diffusion` (the UNet, schedule,
optimiser, training and sampling of brics_cli/diffusion/config.py). Later stages add their own sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from brics_cli.config import load_config, to_dict
from brics_cli.errors import ConfigError
from brics_cli.registry import closest
from brics_cli.data.config import DataConfig
from brics_cli.diffusion.config import DiffusionStageConfig
from brics_cli.models.autoencoder import AutoencoderConfig
from brics_cli.train.ae import AETrainConfig
from brics_cli.train.losses import AELossConfig
from brics_cli.train.optim import AEOptimConfig


@dataclass
class RunConfig:
    dir: str = "runs/demo"  # where ae/, codes/ and diffusion/ go


@dataclass
class AEStageConfig(AutoencoderConfig):
    loss: AELossConfig = field(default_factory=AELossConfig)
    optim: AEOptimConfig = field(default_factory=AEOptimConfig)
    train: AETrainConfig = field(default_factory=AETrainConfig)

    # A resumed run may change how it trains (loss weights, schedule, logging); everything else --
    # the architecture and the optimiser -- and data.resolution must equal the checkpoint's.
    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = ("loss", "train")


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ae: AEStageConfig = field(default_factory=AEStageConfig)
    diffusion: DiffusionStageConfig = field(default_factory=DiffusionStageConfig)

    def resume_conflicts(self, saved: dict[str, Any], stage: str) -> list[str]:
        """Dotted keys whose value differs from a checkpoint's recorded config `saved` and must not."""
        mine = to_dict(self)
        if stage == "ae":
            keys = [f"ae.{k}" for k in sorted(set(mine["ae"]) | set(saved.get("ae", {}))) if k not in AEStageConfig.RESUME_MAY_CHANGE]
            keys.append("data.resolution")
        else:
            keys = [f"diffusion.{k}" for k in DiffusionStageConfig.RESUME_MUST_MATCH]
        return [key for key in keys if _differs(_lookup(mine, key), _lookup(saved, key))]

    def validate(self) -> None:
        # Derived, not checked: the UNet's attention resolutions follow the code size (recorded as
        # concrete values in checkpoints). Whether they fit H_z is checked by the commands that
        # build a UNet (diffusion-train, info), so ae-train never fails on a section it does not use.
        model = self.diffusion.model
        if model.attention_resolutions is None:
            model.attention_resolutions = model.attention_at(self.ae.code.resolution)

    def check_stage(self, stage: str) -> None:
        """The cross-section checks of one stage (`diffusion`): a ConfigError naming the key."""
        if stage == "diffusion":
            try:  # the UNet runs on the key codes: its levels and attention resolutions must fit H_z
                self.diffusion.model.check_resolution(self.ae.code.resolution)
            except ValueError as exc:
                raise ConfigError(f"{exc} (ae.code.resolution={self.ae.code.resolution})") from None


PRESETS = Path(__file__).resolve().parent / "recipes"  # shipped in the wheel (package data)
PAPER_ROWS = Path(__file__).resolve().parent / "paper_rows.yaml"  # every configuration the paper reports


def presets() -> dict[str, Path]:
    """The packaged recipes by name: church, demo, ffhq, webvid."""
    return {p.stem: p for p in sorted(PRESETS.glob("*.yaml"))}


@dataclass(frozen=True)
class PaperRow:
    """One configuration the paper reports: a preset plus overrides (`paper_rows.yaml`)."""

    name: str
    table: str
    row: str
    preset: str
    overrides: tuple[str, ...]
    stages: tuple[str, ...]
    paper: dict[str, float]
    note: str


def paper_rows() -> dict[str, PaperRow]:
    """The paper's rows by name (church-32x32x4, ffhq-16x16x8, ...), in the paper's order."""
    import yaml

    rows = yaml.safe_load(PAPER_ROWS.read_text())
    return {name: PaperRow(name, r["table"], r["row"], r["preset"], tuple(r["overrides"]), tuple(r["stages"]),
                           dict(r["paper"]), " ".join(r["note"].split())) for name, r in rows.items()}


def paper_figures(name: str | Path) -> dict[str, float]:
    """The paper's numbers for a row -- or for a preset, those of its row without overrides; {} for a file."""
    rows = paper_rows()
    if str(name) in rows:
        return rows[str(name)].paper
    if Path(name).exists():  # a file: the packaged preset's own (recipes/church.yaml in a checkout), else none
        same = [stem for stem, path in presets().items() if path.resolve() == Path(name).resolve()]
        name = same[0] if same else ""
    plain = [r for r in rows.values() if r.preset == str(name) and not r.overrides]
    return plain[0].paper if plain else {}


def describe_preset(path: Path) -> str:
    """A preset's first comment line: what it is."""
    return preset_header(path).get("", "")


def preset_header(path: Path) -> dict[str, str]:
    """A preset's leading comment as fields: "" (the first line: what it is), and each `Name:`
    paragraph (Reproduces, Hardware, Expected, ...), continuation lines joined."""
    fields: dict[str, str] = {}
    key = None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        head, sep, rest = text.partition(":")
        if key is None:
            key, fields[""] = "", text
        elif sep and head.isalpha() and head[:1].isupper() and not line.startswith("#  "):
            key, fields[head] = head, rest.strip()
        else:
            fields[key] = f"{fields[key]} {text}".strip()
    return fields


def resolve(name: str | Path) -> tuple[Path, tuple[str, ...]]:
    """(recipe file, overrides it implies): a file; a packaged preset (`church`) when no such file
    exists; or a paper row (`church-32x32x4`) = its preset and overrides."""
    path = Path(name)
    known, rows = presets(), paper_rows()
    if path.is_dir() and len(path.parts) == 1 and str(path) in {*known, *rows}:
        pass  # a folder named like a preset (`brics demo --out demo` makes one) is never a recipe: the preset
    elif path.exists() or path.suffix or len(path.parts) > 1:
        return path, ()
    if str(path) in known:
        return known[str(path)], ()
    if str(path) in rows:
        row = rows[str(path)]
        return known[row.preset], row.overrides
    hint = closest(str(path), [*known, *rows])
    raise ConfigError(f"recipe '{path}' is neither a file, a preset nor a paper row; presets: {', '.join(known)}"
                      + (f"; did you mean '{hint}'?" if hint else "") + " (`brics recipes list` shows the paper's rows too)")


def resolve_recipe(path: str | Path) -> Path:
    """The recipe file a name stands for (see `resolve`)."""
    return resolve(path)[0]


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, preset or paper row with `section.key=value` overrides (after the row's own);
    strict about keys and types."""
    file, implied = resolve(path)
    return load_config(Recipe, file, [*implied, *overrides])


_ABSENT = object()  # a key the saved config does not have: written by a brics before the key existed


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, _ABSENT) if isinstance(tree, dict) else _ABSENT
    return tree


def _differs(mine: Any, saved: Any) -> bool:
    """Whether a checkpoint's config value differs from the recipe's. Keys the checkpoint lacks were
    added later with defaults that keep the old behaviour, so they never count as a difference."""
    if saved is _ABSENT:
        return False
    if isinstance(mine, dict) and isinstance(saved, dict):
        return any(k not in mine or _differs(mine[k], v) for k, v in saved.items())
    return mine != saved
