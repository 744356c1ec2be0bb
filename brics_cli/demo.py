"""`brics demo`: the whole pipeline on the demo photos, each stage the real command, then a report.

    shard demo -> ae-train -> reconstruct --usage -> diffusion-train -> sample -> eval recon
    (-> eval all when the metric weights are present) -> nn-search

Every stage runs `python -m brics_cli <command> ... --json` in a subprocess -- the code path a
user runs by hand -- with its progress and messages in `OUT/logs/<stage>.log`, and its JSON result
kept for the report. Every command resumes by itself, so rerunning `brics demo` continues where
it stopped and repeats only what is cheap. The report (`report.html`, self-contained, and
`report.md` with the figures next to it) shows the training crops, reconstructions with PSNR/SSIM,
grid usage, loss curves, samples, nearest neighbours, stage timings, the machine and the commands.
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from brics_cli import __version__
from brics_cli.errors import BricsError

RECIPE = Path(__file__).resolve().parent / "recipes" / "demo.yaml"  # package data: there in a wheel install too


@dataclass
class Stage:
    name: str
    args: list[str]
    optional_reason: str | None = None  # set: skipped, with this reason
    result: dict[str, Any] | None = None
    seconds: float = 0.0
    status: str = "pending"  # done | skipped | failed
    log: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def command(self) -> str:
        return "brics " + " ".join(shlex.quote(a) for a in self.args)


def plan(out: Path, quick: bool, recipe: Path = RECIPE) -> list[Stage]:
    """The stages, with the overrides that keep everything inside `out` (and small with --quick)."""
    shards, run = out / "shards", out / "run"
    common = [str(recipe), f"data.shards={shards}", f"run.dir={run}"]
    ae_quick = ["ae.train.steps=40", "ae.train.batch=8", "ae.train.sample_every=20", "ae.train.checkpoint_every=20",
                "ae.train.log_every=10", "ae.train.eval_images=32"]
    diff_quick = ["diffusion.train.steps=30", "diffusion.train.batch=16", "diffusion.train.sample_every=30",
                  "diffusion.train.checkpoint_every=30", "diffusion.train.log_every=10"]
    shard_args = ["shard", "demo", "--out", str(shards), "--workers", "2"]
    if quick:
        shard_args += ["--train-count", "256", "--val-count", "64"]
    n_samples = 16 if quick else 64
    sample_steps = ["--steps", "10"] if quick else []
    stages = [
        Stage("shard", shard_args),
        Stage("ae-train", ["ae-train", *common, *(ae_quick if quick else [])]),
        Stage("reconstruct", ["reconstruct", "--run", str(run / "ae"), "--input", str(shards), "--out", str(out / "recon"),
                              "--usage", *(["--n", "64"] if quick else [])]),
        Stage("diffusion-train", ["diffusion-train", *common, *(diff_quick if quick else [])]),
        Stage("sample", ["sample", "--run", str(run / "diffusion"), "--n", str(n_samples), "--out", str(out / "samples"),
                         *sample_steps]),
        Stage("eval-recon", ["eval", "recon", "--samples", str(out / "recon"), *lpips_flag()]),
    ]
    missing = generative_weights_missing()
    stages.append(Stage("eval-generative", ["eval", "all", "--samples", str(out / "samples"), "--ref", str(shards)],
                        optional_reason=missing))
    stages.append(Stage("nn-search", ["nn-search", "--samples", str(out / "samples"), "--ref", str(shards), "--k", "5",
                                      "--queries", "8", "--metric", "l2", "--out", str(out / "nn")]))
    return stages


def lpips_flag() -> list[str]:
    """LPIPS-AlexNet when its backbone is present; otherwise PSNR/SSIM only (the report says so)."""
    from brics_cli.nets import weights

    return [] if weights.locate("alexnet") is not None else ["--lpips-net", "none"]


def generative_weights_missing() -> str | None:
    """Why FID/IS/KID/PR/CLIP-FID cannot run here, or None when every weight file is present."""
    from brics_cli.nets import weights

    needed = ("inception-fidelity", "vgg16", "clip-vit-b-32")  # FID/IS/KID, precision/recall, CLIP-FID
    absent = [row["file"] for row in weights.status(verify=False) if row["name"] in needed and not row["present"]]
    if absent:
        return f"pretrained weights not present ({', '.join(sorted(set(absent)))}); see `brics weights status`"
    return None


def run_stage(stage: Stage, out: Path, env: dict[str, str]) -> None:
    stage.log = out / "logs" / f"{stage.name}.log"
    stage.log.parent.mkdir(parents=True, exist_ok=True)
    if stage.optional_reason:
        stage.status = "skipped"
        return
    start = time.perf_counter()
    with open(stage.log, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "brics_cli", *stage.args, "--json"], stdout=subprocess.PIPE,
                              stderr=log, text=True, env=env)
    stage.seconds = time.perf_counter() - start
    if proc.returncode != 0:
        stage.status = "failed"
        tail = stage.log.read_text().strip().splitlines()[-5:]
        raise BricsError(f"demo stage '{stage.name}' failed (exit {proc.returncode}): {' | '.join(tail)} -- full log {stage.log}; "
                         f"rerun `brics demo` to resume")
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    stage.result = json.loads(lines[-1]) if lines else {}
    stage.status = "done"


def run_demo(out: Path, quick: bool, on_stage: Callable[[Stage, int, int], None] | None = None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    stages = plan(out, quick)
    env = dict(os.environ)
    t0 = time.perf_counter()
    for i, stage in enumerate(stages):
        run_stage(stage, out, env)
        if on_stage is not None:
            on_stage(stage, i, len(stages))
    total = time.perf_counter() - t0
    summary = write_report(out, stages, quick, total)
    return summary


# -- the report -----------------------------------------------------------------------------------


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


def loss_curves(out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    ae = [json.loads(line) for line in (out / "run" / "ae" / "metrics.jsonl").read_text().splitlines()]
    axes[0].plot([r["step"] for r in ae], [r["l2"] for r in ae], label="train L2 (MSE)")
    axes[0].set_yscale("log")
    axes[0].set_title("autoencoder: L2")
    axes[0].set_xlabel("step")
    val = [(r["step"], r["val_psnr_ema"]) for r in ae if "val_psnr_ema" in r]
    if val:
        axes[1].plot(*zip(*val), marker="o", color="#c44e52")
    axes[1].set_title("autoencoder: EMA PSNR on held-out crops (dB)")
    axes[1].set_xlabel("step")
    diff = [json.loads(line) for line in (out / "run" / "diffusion" / "metrics.jsonl").read_text().splitlines()]
    axes[2].plot([r["step"] for r in diff], [r["loss"] for r in diff], color="#55a868")
    axes[2].set_title("diffusion: epsilon loss")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%;image-rendering:pixelated">'


def write_report(out: Path, stages: list[Stage], quick: bool, total: float) -> dict[str, Any]:
    figures = out / "report"
    figures.mkdir(exist_ok=True)
    by_name = {s.name: s for s in stages}
    training_crops(out / "shards", figures / "training-crops.png")
    loss_curves(out, figures / "loss-curves.png")
    recon = json.loads((out / "recon" / "metrics.json").read_text())
    ae_result = by_name["ae-train"].result or json.loads((out / "run" / "ae" / "result.json").read_text())
    pictures = [
        ("Training crops (the demo shards)", figures / "training-crops.png"),
        ("Held-out inputs (top) over reconstructions (bottom)", out / "recon" / "grid.png"),
        ("Grid usage: hits per finest-level entry, per group (Fig. 4b)", out / "recon" / "usage.png"),
        ("Loss curves", figures / "loss-curves.png"),
        ("Samples: diffusion on key codes, decoded by the autoencoder", out / "samples" / "grid.png"),
        ("Nearest neighbours (L2): each row a sample, then its 5 nearest training crops", out / "nn" / "nn-grid.png"),
    ]
    numbers = {
        "psnr": recon["psnr"]["mean"], "psnr_std": recon["psnr"]["std"],
        "ssim": recon["ssim"]["mean"], "ssim_std": recon["ssim"]["std"],
        "lpips": recon["lpips"]["mean"] if recon.get("lpips") else None,
        "images": recon["n"], "usage": recon.get("usage"),
    }
    summary = {
        "out": str(out), "quick": quick, "seconds": round(total, 1), "machine": machine(),
        "reconstruction": numbers, "ae": {k: ae_result.get(k) for k in ("step", "seconds", "eval")},
        "stages": [{"name": s.name, "status": s.status, "seconds": round(s.seconds, 1), "command": s.command(),
                    **({"reason": s.optional_reason} if s.optional_reason else {})} for s in stages],
        "report": str(out / "report.html"),
    }
    full_scale = [
        "brics shard lsun church_outdoor_train_lmdb --val-lmdb church_outdoor_val_lmdb --out shards/church --workers 8",
        "torchrun --nproc_per_node 8 -m brics_cli ae-train recipes/church.yaml --device cuda",
        "brics reconstruct --run runs/church/ae --input shards/church --out runs/church/recon --usage",
        "torchrun --nproc_per_node 2 -m brics_cli diffusion-train recipes/church.yaml --device cuda",
        "brics sample --run runs/church/diffusion --n 50000 --out samples/church --batch 64",
        "brics eval all --samples samples/church",
        "brics nn-search --samples samples/church --ref shards/church --metric lpips",
    ]
    md = [f"# brics demo report ({'quick' if quick else 'full'}, {time.strftime('%Y-%m-%d %H:%M')})", "",
          f"Reconstruction of {numbers['images']} held-out crops by the EMA autoencoder: "
          f"**PSNR {numbers['psnr']:.2f} +- {numbers['psnr_std']:.2f} dB, SSIM {numbers['ssim']:.4f} +- {numbers['ssim_std']:.4f}**"
          + (f", LPIPS {numbers['lpips']:.4f}" if numbers["lpips"] is not None else " (LPIPS: weights not present)")
          + ". Compression: 64x64x3 pixels -> 16x16x4 key codes (12x, as the paper's 256x256x3 -> 64x64x4).", "",
          f"Total {total:.0f} s on {summary['machine']['cpus']} CPUs ({summary['machine']['platform']}, torch "
          f"{summary['machine']['torch']}, {summary['machine']['torch_threads']} threads).", "",
          "| stage | status | seconds | command |", "|---|---|---|---|"]
    for s in stages:
        status = s.status if not s.optional_reason else f"skipped: {s.optional_reason}"
        md.append(f"| {s.name} | {status} | {s.seconds:.1f} | `{s.command()}` |")
    md += [""]
    for title, path in pictures:
        if path.is_file():
            rel = os.path.relpath(path, out)
            md += [f"## {title}", "", f"![{title}]({rel})", ""]
    md += ["## At full scale (LSUN-Church, the paper's configuration)", "", "```console",
           *[f"$ {c}" for c in full_scale], "```", ""]
    (out / "report.md").write_text("\n".join(md))
    body = [f"<h1>brics demo report</h1><p>{html.escape(md[2]).replace('**', '')}</p><p>{html.escape(md[4])}</p>",
            "<table border=1 cellpadding=4 style='border-collapse:collapse'><tr><th>stage</th><th>status</th>"
            "<th>seconds</th><th>command</th></tr>"]
    for s in stages:
        status = s.status if not s.optional_reason else f"skipped: {s.optional_reason}"
        body.append(f"<tr><td>{s.name}</td><td>{html.escape(status)}</td><td>{s.seconds:.1f}</td>"
                    f"<td><code>{html.escape(s.command())}</code></td></tr>")
    body.append("</table>")
    for title, path in pictures:
        if path.is_file():
            body.append(f"<h2>{html.escape(title)}</h2>{_img(path, title)}")
    body.append("<h2>At full scale</h2><pre>" + html.escape("\n".join(f"$ {c}" for c in full_scale)) + "</pre>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>brics demo report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}code,pre{font-size:12px}</style>"
            "</head><body>" + "\n".join(body) + "</body></html>")
    (out / "report.html").write_text(page)
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
