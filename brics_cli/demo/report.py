"""The demo's report: OUT/report.html (self-contained) and OUT/report.md, from a finished run folder."""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brics_cli import __version__
from brics_cli.demo.stages import RECIPE, Stage, demo_recipe


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "brics": __version__}


def training_crops(shards: Path, path: Path, n: int = 32) -> None:
    import torch

    from brics_cli.data.config import DataConfig
    from brics_cli.data.loader import ShardDataset
    from brics_cli.core.images import save_image_grid

    manifest = json.loads((shards / "manifest.json").read_text())
    resolution = manifest["options"]["resolution"]
    cfg = DataConfig(shards=str(shards), resolution=resolution, workers=0, shuffle=0, flip=False)
    images = []
    for image, _ in ShardDataset(cfg, "train"):
        images.append(image)
        if len(images) == n:
            break
    save_image_grid(torch.stack(images), path, per_row=8)


def _records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's whole records (a torn last line of a killed stage is skipped)."""
    from brics_cli.train.metrics_log import MetricsLog

    return MetricsLog(path.parent, enabled=False).records()


def loss_curves(out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    ae = [r for r in _records(out / "run" / "ae" / "metrics.jsonl") if "l2" in r]
    axes[0].plot([r["step"] for r in ae], [r["l2"] for r in ae], label="train L2 (MSE)")
    axes[0].set_yscale("log")
    axes[0].set_title("autoencoder: L2")
    axes[0].set_xlabel("step")
    val = [(r["step"], r["val_psnr_ema"]) for r in ae if "val_psnr_ema" in r]
    if val:
        axes[1].plot(*zip(*val), marker="o", color="#c44e52")
    axes[1].set_title("autoencoder: EMA PSNR on held-out crops (dB)")
    axes[1].set_xlabel("step")
    diff = [r for r in _records(out / "run" / "diffusion" / "metrics.jsonl") if "loss" in r]  # not the eval-curve records
    axes[2].plot([r["step"] for r in diff], [r["loss"] for r in diff], color="#55a868")
    axes[2].set_title("diffusion: epsilon loss")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


PAPER_ROW = "church-64x64x4"  # Table 2's main configuration: the one the demo scales down (the same 12x compression)
QUICK_MEASURED = {"psnr": 14.1, "ssim": 0.41}  # what `brics demo --quick` gave, on QUICK_MEASURED_ON
QUICK_MEASURED_ON = "2 CPU cores, torch 2.14.1, 2026-12-02"
SCALE = 2  # pixel figures are shown at twice their size, nearest-neighbour: a 64 px crop is a thumbnail otherwise
FULL_SCALE = [  # the paper's pipeline: (command, field of recipes/church.yaml's header on its cost, paper numbers it targets)
    ("brics shard lsun church_outdoor_train_lmdb --val-lmdb church_outdoor_val_lmdb --out shards/church --workers 8", None, ()),
    # One GPU, as the paper: torchrun needs a rank count that divides ae.train.batch (12), so 8 ranks are refused.
    ("brics ae-train recipes/church.yaml --device cuda", "Hardware", ("psnr", "ssim", "lpips")),
    ("brics reconstruct --from runs/church --input shards/church --out runs/church/recon --usage", None,
     ("psnr", "ssim", "lpips")),
    ("torchrun --nproc_per_node 2 -m brics_cli diffusion-train recipes/church.yaml --device cuda", "Expected", ()),
    ("brics sample --from runs/church --num-samples 50000 --out samples/church --batch 64", None, ()),
    ("brics eval all --samples samples/church", None, ("fid", "clip_fid")),
    ("brics nn-search --samples samples/church --ref shards/church --metric lpips", None, ()),
]
METRIC_LABELS = {"psnr": ("PSNR", " dB", 2), "ssim": ("SSIM", "", 4), "lpips": ("LPIPS", "", 4), "fid": ("FID", "", 2),
                 "clip_fid": ("CLIP-FID", "", 2)}  # key -> (label, unit, decimals of this run's value)


@dataclass
class Section:
    """One part of the report, written twice: Markdown (figures as files beside report.md) and HTML (figures inline)."""

    title: str
    md: list[str]
    html: str


def _inline(text: str) -> str:
    """Markdown's `code` and **bold** as HTML; everything else escaped."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)


def _table(header: list[str], rows: list[list[str]], css_class: str = "") -> tuple[list[str], str]:
    """A table as Markdown lines and as HTML, from cells written in Markdown."""
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    head = "".join(f"<th>{_inline(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return md + [""], f"<table class='{css_class}'><tr>{head}</tr>{body}</table>"


def _img(data: bytes, alt: str, width: int) -> str:
    """A PNG inline, shown `width` px wide (at most the page's width) with its pixels kept square."""
    src = "data:image/png;base64," + base64.b64encode(data).decode()
    return f'<img alt="{html.escape(alt)}" src="{src}" width="{width}" style="max-width:100%;image-rendering:pixelated">'


def _width(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.size[0]


def _rel(path: str | Path, out: Path) -> str:
    """`path` (as a command recorded it, relative to the current directory or absolute) relative to the report."""
    return Path(os.path.relpath(Path(path).resolve(), out.resolve())).as_posix()


def figure(out: Path, title: str, path: Path, note: str = "", scale: int = SCALE) -> Section:
    """A figure file shown `scale` times its size: a relative link in the Markdown, inline in the HTML."""
    width = _width(path) * scale
    md = [*([note, ""] if note else []), f'<img src="{_rel(path, out)}" alt="{title}" width="{width}">', ""]
    return Section(title, md, (f"<p>{_inline(note)}</p>" if note else "") + _img(path.read_bytes(), title, width))


def demo_recipe_file() -> Path:
    """The demo recipe the stages ran: the checkout's when there is one, else the packaged preset."""
    path = Path(demo_recipe())
    return path if path.is_file() else RECIPE


def run_settings(out: Path) -> dict[str, Any]:
    """What this run trained and sampled, read from what it wrote (resolved configs, manifests)."""
    import yaml

    ae = yaml.safe_load((out / "run" / "ae" / "config.yaml").read_text())
    diffusion = yaml.safe_load((out / "run" / "diffusion" / "config.yaml").read_text())
    counts = json.loads((out / "shards" / "manifest.json").read_text())["counts"]
    samples = json.loads((out / "samples" / "manifest.json").read_text())
    code = ae["ae"]["code"]
    return {"ae_steps": ae["ae"]["train"]["steps"], "ae_batch": ae["ae"]["train"]["batch"],
            "diffusion_steps": diffusion["diffusion"]["train"]["steps"],
            "diffusion_batch": diffusion["diffusion"]["train"]["batch"],
            "train_crops": counts["train"], "val_crops": counts["val"], "resolution": ae["data"]["resolution"],
            "code": f"{code['resolution']}x{code['resolution']}x{code['channels']}",
            "compression": ae["data"]["resolution"] ** 2 * 3 / (code["resolution"] ** 2 * code["channels"]),
            "samples": samples["count"], "sampler": samples["sampler"], "sampler_steps": samples["steps"]}


def full_demo_settings() -> dict[str, Any]:
    """What `brics demo` without --quick runs: the demo recipe's steps and `brics shard demo`'s default crop counts."""
    import yaml

    from brics_cli.data.sources.demo import DemoOptions

    recipe, crops = yaml.safe_load(demo_recipe_file().read_text()), DemoOptions()
    return {"ae_steps": recipe["ae"]["train"]["steps"], "diffusion_steps": recipe["diffusion"]["train"]["steps"],
            "train_crops": crops.train_count, "val_crops": crops.val_count}


def full_demo_expected() -> dict[str, float | None]:
    """The full demo's expected PSNR (dB), SSIM and training minutes, read from the `Expected:` paragraph of the
    demo recipe's header (None where it gives none)."""
    from brics_cli.recipe import preset_header

    text = preset_header(demo_recipe_file()).get("Expected", "")
    patterns = {"psnr": r"PSNR ~([\d.]+) dB", "ssim": r"SSIM ~([\d.]+)", "ae-train": r"ae-train ~([\d.]+) min",
                "diffusion-train": r"diffusion-train ~([\d.]+) min"}
    return {key: float(m.group(1)) if (m := re.search(pattern, text)) else None for key, pattern in patterns.items()}


def paper_reference() -> dict[str, Any]:
    """The paper's row the demo scales down (numbers, where it is reported) and the church preset's header."""
    import yaml

    from brics_cli.recipe import paper_rows, preset_header, presets

    row, church = paper_rows()[PAPER_ROW], presets()["church"]
    return {"numbers": row.paper, "where": f"{row.table}: {row.row}", "header": preset_header(church),
            "resolution": yaml.safe_load(church.read_text())["data"]["resolution"]}


def reconstruction_pairs(out: Path) -> list[tuple[str, Path, Path, float]]:
    """Every pair `brics reconstruct` wrote (its manifest's count): (name, input, reconstruction, PSNR of the two PNGs)."""
    import torch

    from brics_cli.core.images import load_image
    from brics_cli.eval.recon_metrics import psnr

    count = json.loads((out / "recon" / "manifest.json").read_text())["count"]
    names = [f"{i:06d}" for i in range(count)]
    pairs = [(out / "recon" / "inputs" / f"{n}.png", out / "recon" / "recon" / f"{n}.png") for n in names]
    values = psnr(torch.stack([load_image(r) for _, r in pairs]), torch.stack([load_image(i) for i, _ in pairs]))  # (N,)
    return [(n, i, r, v) for n, (i, r), v in zip(names, pairs, values.tolist())]


def _value(key: str, result: dict[str, Any] | None) -> str:
    """This run's number for a metric (mean +- std where there is one), or why there is none."""
    label, unit, digits = METRIC_LABELS[key]
    value = (result or {}).get(key)
    if value is None:
        return "not measured"
    if isinstance(value, dict):
        return f"**{value['mean']:.{digits}f}** ± {value['std']:.{digits}f}{unit}"
    return f"**{value:.{digits}f}**{unit}"


def title_section(quick: bool, this: dict[str, Any], full: dict[str, Any]) -> Section:
    mode = "quick" if quick else "full"
    what = (f"{this['ae_steps']} autoencoder steps (batch {this['ae_batch']}) and {this['diffusion_steps']} diffusion steps "
            f"(batch {this['diffusion_batch']}) on {this['train_crops']} training and {this['val_crops']} held-out "
            f"{this['resolution']}x{this['resolution']} crops of real photos; {this['samples']} samples, {this['sampler']} "
            f"with {this['sampler_steps']} steps")
    if quick:
        text = (f"**Quick run** (`brics demo --quick`): {what}. It checks that every stage runs end to end; the models "
                f"have barely started to learn. The full demo (`brics demo`) trains {full['ae_steps']} + "
                f"{full['diffusion_steps']} steps on {full['train_crops']} + {full['val_crops']} crops.")
    else:
        text = f"**Full run** (`brics demo`): {what}, as the demo recipe's header describes."
    title = f"brics demo report: {mode} run ({time.strftime('%Y-%m-%d %H:%M')})"
    return Section(title, [text, ""], f"<p>{_inline(text)}</p>")


def numbers_section(quick: bool, recon: dict[str, Any], generative: dict[str, Any] | None, this: dict[str, Any],
                    full: dict[str, Any], expected: dict[str, float | None], paper: dict[str, Any]) -> Section:
    """Every number of the run beside the full demo's expected value and the paper's, and what to expect."""
    header = ["metric", "this run", *(["quick demo, measured"] if quick else []), "full demo, expected", "paper"]
    rows = []
    for key, (label, unit, _) in METRIC_LABELS.items():
        result = generative if key in ("fid", "clip_fid") else recon
        quick_ref = [f"~{QUICK_MEASURED[key]}{unit}" if key in QUICK_MEASURED else "—"] if quick else []
        full_ref = f"~{expected[key]:g}{unit}" if expected.get(key) is not None else "—"
        paper_ref = f"{paper['numbers'][key]:g}{unit}" if key in paper["numbers"] else "—"
        rows.append([label, _value(key, result), *quick_ref, full_ref, paper_ref])
    md, table = _table(header, rows)
    church = paper["header"]
    pixels = (paper["resolution"] // this["resolution"]) ** 2
    intro = (f"Reconstructions of the {recon['n']} held-out crops (photos never seen in training) by the EMA autoencoder, "
             f"{this['resolution']}x{this['resolution']}x3 pixels -> {this['code']} key codes ({this['compression']:g}x, the "
             f"paper's compression); mean ± std over images.")
    if quick:
        full_psnr = f"~{expected['psnr']:g} dB" if expected["psnr"] else "expected value"
        expect = (f"**What to expect**: a quick run stops after {this['ae_steps']} of the full demo's {full['ae_steps']} "
                  f"autoencoder steps, so its PSNR lies far below the full demo's {full_psnr} (a quick run gave "
                  f"{QUICK_MEASURED['psnr']} dB on {QUICK_MEASURED_ON}) and its samples are blurry colour fields: a smoke "
                  "test that works, not a bug.")
    else:
        expect = ("**What to expect**: a full run lands near the full demo's expected values, measured on "
                  f"{preset_hardware()}; small differences across machines and torch versions are normal.")
    caveat = (f"The paper's column -- {paper['where']} -- is LSUN-Church at {paper['resolution']}x{paper['resolution']} "
              f"({pixels}x the pixels of a demo crop, other photos) after days of GPU training: "
              f"{church.get('Expected', '').rstrip('.')}. A demo number is not comparable with it 1:1.")
    notes = [expect, "", caveat, ""]
    if recon.get("lpips") is None:
        notes += ["LPIPS needs the AlexNet weights (`brics weights status`); without them the demo measures PSNR and SSIM.", ""]
    return Section("Numbers and what to expect", [intro, "", *md, *notes],
                   f"<p>{_inline(intro)}</p>{table}" + "".join(f"<p>{_inline(p)}</p>" for p in notes if p))


def preset_hardware() -> str:
    """The demo recipe's `Hardware:` line, up to its first comma (the machine it was measured on)."""
    from brics_cli.recipe import preset_header

    return preset_header(demo_recipe_file()).get("Hardware", "").split(",")[0] or "the recipe's machine"


def stages_section(stages: list[Stage], expected: dict[str, float | None], total: float, info: dict[str, Any]) -> Section:
    rows = []
    for s in stages:
        status = s.status if not s.optional_reason else f"skipped: {s.optional_reason}"
        minutes = expected.get(s.name)
        rows.append([s.name, status, f"{s.seconds:.1f}", f"~{minutes:g} min" if minutes else "", f"`{s.command()}`"])
    md, table = _table(["stage", "status", "seconds", "full demo, expected", "command"], rows, "stages")
    threads = info["torch_threads"]
    machine_line = (f"Total {total:.0f} s on {info['cpus']} CPUs ({info['platform']}, torch {info['torch']}, "
                    f"{threads} thread{'s' if threads != 1 else ''}" + (f", {info['cuda']}" if info["cuda"] else "")
                    + "). Each stage's log: `logs/STAGE.log`.")
    return Section("Stages", [machine_line, "", *md], f"<p>{_inline(machine_line)}</p>{table}")


def gallery_section(out: Path, pairs: list[tuple[str, Path, Path, float]]) -> Section:
    """Every held-out pair, input beside reconstruction, each with its PSNR."""
    values = [v for *_, v in pairs]
    worst, best = min(pairs, key=lambda p: p[3]), max(pairs, key=lambda p: p[3])
    note = (f"All {len(pairs)} held-out crops: input (left), reconstruction (right), {SCALE}x. PSNR of each pair from "
            f"the two PNGs in `recon/inputs` and `recon/recon`: mean {sum(values) / len(values):.2f} dB, lowest "
            f"{worst[3]:.2f} dB (`{worst[0]}`), highest {best[3]:.2f} dB (`{best[0]}`). The table above measures the model's "
            f"output before it is rounded to 8 bits, hence a small difference.")
    md, cells = [note, "", "| crop | input | reconstruction | PSNR (dB) |", "|---|---|---|---|"], []
    for name, inp, rec, value in pairs:
        width = _width(inp) * SCALE
        md.append(f'| {name} | <img src="{_rel(inp, out)}" width="{width}"> | <img src="{_rel(rec, out)}" width="{width}"> '
                  f"| {value:.2f} |")
        cells.append(f'<figure class="pair" data-psnr="{value:.4f}">{_img(inp.read_bytes(), f"{name} input", width)}'
                     f'{_img(rec.read_bytes(), f"{name} reconstruction", width)}'
                     f"<figcaption>{name}: <b>{value:.2f} dB</b></figcaption></figure>")
    return Section("Reconstructions, every held-out crop", md + [""],
                   f"<p>{_inline(note)}</p><div class='gallery'>{''.join(cells)}</div>")


def sampler_section(out: Path) -> Section:
    manifest = json.loads((out / "samples" / "manifest.json").read_text())
    step = re.search(r"step-(\d+)", Path(manifest["checkpoint"]).name)
    rows = [["sampler", f"`{manifest['sampler']}`"], ["steps", str(manifest["steps"])], ["eta", f"{manifest['eta']:g}"],
            ["seed", str(manifest["seed"])], ["weights", "EMA" if manifest.get("ema") else "raw (no EMA)"],
            ["images", str(manifest["count"])], ["diffusion checkpoint", f"`{_rel(manifest['checkpoint'], out)}`"],
            ["checkpoint step", str(int(step.group(1))) if step else "?"]]
    if manifest.get("ae_checkpoint"):
        rows.append(["autoencoder checkpoint", f"`{_rel(manifest['ae_checkpoint'], out)}`"])
    md, table = _table(["sampler setting", "value"], rows)
    return Section("Sampler settings (`samples/manifest.json`)", md, table)


def nn_cells(sheet_path: Path, cell: tuple[int, int], cols: int, max_rows: int) -> list[list[bytes]] | None:
    """`brics nn-search`'s contact sheet cut back into its cells (PNG bytes; up to `max_rows` rows of `cols`
    cells of `cell` = (w, h) pixels with equal gaps), or None when its width does not fit that layout."""
    import io

    from PIL import Image

    with Image.open(sheet_path) as sheet:
        sheet = sheet.convert("RGB")
    (w, h), (width, height) = cell, sheet.size
    gap, uneven = divmod(width - cols * w, cols - 1) if cols > 1 else (0, 0)
    if uneven or gap < 0:
        return None
    rows = min(max_rows, (height + gap) // (h + gap))  # the sheet holds the first queries' rows
    cells = []
    for y in range(rows):
        row = []
        for x in range(cols):
            buffer = io.BytesIO()
            sheet.crop((x * (w + gap), y * (h + gap), x * (w + gap) + w, y * (h + gap) + h)).save(buffer, "PNG")
            row.append(buffer.getvalue())
        cells.append(row)
    return cells


def nn_section(out: Path) -> Section:
    """Each sample with its nearest training crops, every neighbour labelled with its key and distance (nn.json)."""
    from PIL import Image

    report = json.loads((out / "nn" / "nn.json").read_text())
    queries = report["queries"]
    k = max(len(q["neighbours"]) for q in queries)
    header = ["sample", *[f"neighbour {i + 1}" for i in range(k)]]
    rows = [[f"`{Path(q['sample']).stem}`", *[f"`{n['key']}` {n['distance']:.4g}" for n in q["neighbours"]]] for q in queries]
    md, table = _table(header, rows)
    sheet = out / "nn" / "nn-grid.png"
    note = (f"Each row: a sample, then its {k} nearest training crops, nearest first, labelled with the crop's key and "
            f"its distance ({report['search']['distance']}). A sample that copied a training crop would sit at a distance "
            f"near 0.")
    with Image.open(out / "samples" / queries[0]["sample"]) as first:
        cell = first.size
    cells = nn_cells(sheet, cell, k + 1, len(queries))
    md = [note, "", f'<img src="{_rel(sheet, out)}" alt="nearest neighbours" width="{_width(sheet) * SCALE}">', "", *md]
    if cells is None:  # a layout this report does not know: the sheet as it is, the distances below it
        return Section("Nearest neighbours", md, f"<p>{_inline(note)}</p>" + _img(sheet.read_bytes(), "nearest neighbours",
                                                                                  _width(sheet) * SCALE) + table)
    width = cell[0] * SCALE
    body = []
    for q, row in zip(queries, cells):
        labels = [f"sample <code>{html.escape(Path(q['sample']).stem)}</code>"] + [
            f"#{i + 1} <code>{html.escape(n['key'])}</code><br><span class='distance'>{n['distance']:.4g}</span>"
            for i, n in enumerate(q["neighbours"])]
        body.append("<tr>" + "".join(f"<td><figure>{_img(png, label, width)}<figcaption>{label}</figcaption></figure></td>"
                                     for png, label in zip(row, labels)) + "</tr>")
    rest = queries[len(cells):]
    extra = table if rest else ""  # rows past the sheet's: their distances as text
    return Section("Nearest neighbours", md, f"<p>{_inline(note)}</p><table class='nn'>{''.join(body)}</table>{extra}")


def full_scale_section(paper: dict[str, Any]) -> Section:
    """The paper's pipeline: each command with its hardware and time (the church preset's header) and its target."""
    church, numbers = paper["header"], paper["numbers"]
    rows = []
    for command, cost, targets in FULL_SCALE:
        hardware = church.get(cost, "") if cost else ""
        if cost == "Hardware":
            hardware += " Training time: not reported in the paper."
        target = ", ".join(f"{METRIC_LABELS[k][0]} {numbers[k]:g}{METRIC_LABELS[k][1]}" for k in targets if k in numbers)
        rows.append([f"`{command}`", hardware or "—", target or "—"])
    md, table = _table(["command", "hardware and time (`recipes/church.yaml`)", "target (the paper)"], rows, "full")
    note = (f"The paper's pipeline on LSUN-Church; the targets are the paper's {paper['where']} "
            f"(`brics recipes list` shows every row).")
    return Section("At full scale (LSUN-Church 256x256, the paper's configuration)", [note, "", *md],
                   f"<p>{_inline(note)}</p>{table}")


CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}code,pre{font-size:12px}"
       "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:3px 6px;vertical-align:top}"
       "figure{margin:0;text-align:center}figcaption{font-size:12px}.gallery{display:flex;flex-wrap:wrap;gap:10px}"
       ".pair img{margin:0 1px}table.nn td{border:none;padding:2px}table.stages td:first-child{white-space:nowrap}"
       "table.full{width:100%;table-layout:fixed}table.full th:first-child{width:50%}")


def write_report(out: Path, stages: list[Stage], quick: bool, total: float) -> dict[str, Any]:
    """OUT/report.md (figures beside it), OUT/report.html (self-contained) and OUT/report.json (the summary),
    from the stages' results and what they wrote under `out`."""
    figures = out / "report"
    figures.mkdir(exist_ok=True)
    by_name = {s.name: s for s in stages}
    training_crops(out / "shards", figures / "training-crops.png")
    loss_curves(out, figures / "loss-curves.png")
    recon = json.loads((out / "recon" / "metrics.json").read_text())
    ae_result = by_name["ae-train"].result or json.loads((out / "run" / "ae" / "result.json").read_text())
    generative = by_name["eval-generative"].result if "eval-generative" in by_name else None
    this, full, expected, paper, info = run_settings(out), full_demo_settings(), full_demo_expected(), paper_reference(), machine()
    title = title_section(quick, this, full)
    sections = [
        numbers_section(quick, recon, generative, this, full, expected, paper),
        figure(out, "Training crops (the demo shards)", figures / "training-crops.png"),
        gallery_section(out, reconstruction_pairs(out)),
        figure(out, "Grid usage (Fig. 4b)", out / "recon" / "usage.png", scale=1,
               note="Hits per finest-level grid entry, per group; the fraction of entries hit: "
                    + ", ".join(f"{u:.0%}" for u in recon.get("usage") or []) + "."),
        figure(out, "Loss curves", figures / "loss-curves.png", scale=1),
        figure(out, "Samples: diffusion on key codes, decoded by the autoencoder", out / "samples" / "grid.png"),
        sampler_section(out),
        nn_section(out),
        stages_section(stages, expected, total, info),
        full_scale_section(paper),
    ]
    md = [f"# {title.title}", "", *title.md]
    for s in sections:
        md += [f"## {s.title}", "", *s.md]
    (out / "report.md").write_text("\n".join(md) + "\n")
    body = [f"<h1>{_inline(title.title)}</h1>{title.html}"] + [f"<h2>{_inline(s.title)}</h2>{s.html}" for s in sections]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{_inline(title.title)}</title><style>{CSS}</style>"
            "</head><body>" + "\n".join(body) + "</body></html>")
    (out / "report.html").write_text(page)
    numbers = {
        "psnr": recon["psnr"]["mean"], "psnr_std": recon["psnr"]["std"],
        "ssim": recon["ssim"]["mean"], "ssim_std": recon["ssim"]["std"],
        "lpips": recon["lpips"]["mean"] if recon.get("lpips") else None,
        "images": recon["n"], "usage": recon.get("usage"),
    }
    summary = {
        "out": str(out), "quick": quick, "seconds": round(total, 1), "machine": info,
        "reconstruction": numbers, "ae": {k: ae_result.get(k) for k in ("step", "seconds", "eval")},
        "expected": {"full_demo": expected, "paper": {k: paper["numbers"].get(k) for k in METRIC_LABELS}, "paper_row": PAPER_ROW},
        "stages": [{"name": s.name, "status": s.status, "seconds": round(s.seconds, 1), "command": s.command(),
                    **({"reason": s.optional_reason} if s.optional_reason else {})} for s in stages],
        "report": str(out / "report.html"),
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
