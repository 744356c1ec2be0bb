"""`brics info RECIPE [key=value ...]`: parameters and MACs of every component of a recipe's model."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from brics_cli.cli.output import emit_json, human_count


def info(
    recipe: Path = typer.Argument(..., help="A recipe file or preset name (`brics recipes list`), e.g. church or my.yaml."),
    overrides: Optional[List[str]] = typer.Argument(None, help="section.key=value overrides, e.g. ae.grid.levels=8."),
    memory: bool = typer.Option(False, "--memory", help="Also measure peak memory of one retrieval training step (batch 1)."),
    device: str = typer.Option("cpu", "--device", help="Device for --memory: cpu or cuda."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Parameters and multiply-accumulates (torch.utils.flop_counter, MACs = FLOPs / 2) per component,
    for one image at the recipe's resolution; `decode` = grids + retrieval (F_mlp) + decoder; `unet` =
    one denoising step of the diffusion UNet on one key code."""
    from brics_cli.config import to_dict
    from brics_cli.errors import ConfigError
    from brics_cli.recipe import load_recipe, paper_figures

    cfg = load_recipe(recipe, overrides or [])
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be cpu or cuda, got '{device}'")

    from brics_cli.models.summary import component_report, retrieval_training_memory

    try:
        report = component_report(cfg.ae, cfg.data.resolution, unet=cfg.diffusion.model)
    except ValueError as exc:  # a combination of sizes the model cannot be built with
        raise ConfigError(f"{recipe}: {exc}") from exc
    result = {"recipe": str(recipe), "resolution": cfg.data.resolution, **report, "paper": paper_figures(recipe)}
    if memory:
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu")
        result["memory"] = {
            "retrieval_training_step": retrieval_training_memory(cfg.ae, cfg.data.resolution, 1, device),
            "device": device,
        }
    result["config"] = to_dict(cfg)
    if json_output:
        emit_json(result)
        return
    _print_table(result)


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    res = result["resolution"]
    table = Table(title=f"{result['recipe']} -- one {res}x{res} image")
    table.add_column("component")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    paper = result["paper"]
    if paper:  # Table 3's figures (its "GFlops" are MACs: REFERENCES section 4)
        table.add_column("paper", justify="right")
    figures = {"grids": human_count(paper["grid_params"]) if "grid_params" in paper else "",
               "decoder": human_count(paper["decoder_params"]) if "decoder_params" in paper else "",
               "decode": f"{paper['decode_gmac']:.2f}G" if "decode_gmac" in paper else ""}
    for name, c in result["components"].items():
        label = f"{name} (one step, {result['config']['ae']['code']['resolution']}^2 code)" if name == "unet" else name
        table.add_row(label, human_count(c["params"]), human_count(c["macs"]), *([figures.get(name, "")] if paper else []))
    d = result["decode"]
    table.add_row("[bold]decode[/] (grids + retrieval + decoder)", human_count(d["params"]), human_count(d["macs"]),
                  *([figures["decode"]] if paper else []), end_section=True)
    console = Console()
    console.print(table)
    g = result["grid"]
    console.print(
        f"grids: {g['groups']} groups x {g['levels']} levels, r_max {g['r_max']:g}, "
        f"{g['entries_per_group']:,} entries per group ({g['dense_levels']} dense levels, T = {g['table_size']:,}), "
        f"{g['static_bytes_per_group'] / 2**20:.2f} MiB per group"
    )
    if "memory" in result:
        m = result["memory"]["retrieval_training_step"]
        console.print(
            f"retrieval training step (batch {m['batch']}, {result['memory']['device']}): "
            f"{m['step_peak_bytes'] / 2**20:.1f} MiB allocated at the peak of forward + backward (the paper's "
            f"measure, Suppl. C: 91.2 MB at batch 1 for the church recipe), on top of "
            f"{m['static_bytes'] / 2**20:.1f} MiB of tables"
        )
