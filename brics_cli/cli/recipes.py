"""`brics recipes list|show`: the packaged presets and the paper's rows, by name, wherever brics is installed."""

from __future__ import annotations

from typing import List, Optional

import typer

from brics_cli.cli.output import emit_json

app = typer.Typer(help="The packaged recipes (presets) and the paper's rows: list them, print one to copy and edit.",
                  no_args_is_help=True)

METRIC_NAMES = {"lpips": "LPIPS", "ssim": "SSIM", "psnr": "PSNR", "fid": "FID", "clip_fid": "CLIP-FID", "is": "IS",
                "precision": "precision", "recall": "recall", "grid_params": "grid", "decoder_params": "decoder",
                "decode_gmac": "decode GMAC"}


def paper_numbers(paper: dict[str, float]) -> str:
    """`LPIPS 0.12, SSIM 0.67, grid 11.4M`: a row's numbers as the paper gives them."""
    return ", ".join(f"{METRIC_NAMES.get(k, k)} {v / 1e6:.1f}M" if k.endswith("params") else f"{METRIC_NAMES.get(k, k)} {v:g}"
                     for k, v in paper.items()) or "a figure only"


@app.command("list")
def list_recipes(json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout.")) -> None:
    """List the presets and the paper's rows; every command taking a recipe accepts either by name
    (`brics info church`, `brics ae-train church-32x32x4`)."""
    from brics_cli.recipe import paper_rows, preset_header, presets

    report = {
        "presets": {name: {"file": str(path), "description": (h := preset_header(path)).get("", ""),
                           "reproduces": h.get("Reproduces"), "hardware": h.get("Hardware"), "expected": h.get("Expected")}
                    for name, path in presets().items()},
        "rows": {name: {"table": r.table, "row": r.row, "preset": r.preset, "overrides": list(r.overrides),
                        "stages": list(r.stages), "paper": r.paper, "note": r.note} for name, r in paper_rows().items()},
    }
    if json_output:
        emit_json(report)
        return
    print("Presets -- `brics recipes show NAME` prints one resolved:")
    for name, p in report["presets"].items():
        print(f"  {name:<8} {p['description']}\n           hardware: {p['hardware']}")
    print("\nThe paper's rows -- a preset plus overrides, run as `brics STAGE NAME`:")
    for name, r in report["rows"].items():
        print(f"  {name:<24} {r['table']}: {r['row']}\n  {'':<24} {' -> '.join(r['stages'])}; paper: {paper_numbers(r['paper'])}")


@app.command("show")
def show_recipe(
    name: str = typer.Argument(..., help="A preset (church, demo, ffhq, webvid), a paper row or a recipe file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Overrides `section.key=value`, applied before printing."),
) -> None:
    """Print the resolved recipe -- every key with its value, defaults included -- as YAML to copy and edit."""
    import yaml

    from brics_cli.config import to_dict
    from brics_cli.recipe import load_recipe, resolve

    file, implied = resolve(name)
    print(f"# brics recipes show {name}: {file}" + (f" with {' '.join(implied)}" if implied else "") + ", resolved")
    print(yaml.safe_dump(to_dict(load_recipe(name, overrides or [])), sort_keys=False), end="")
