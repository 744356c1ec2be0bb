"""Variants of the demo autoencoder trained with one budget and scored side by side.

Each variant is `recipes/demo.yaml` plus a few overrides, trained by `brics ae-train` on the demo
data (`brics shard demo`) with the recipe's budget (same steps and batch), then its EMA model is
scored by `brics reconstruct` on the held-out crops (PSNR, SSIM, and LPIPS when the AlexNet weights
are present). Parameters and MACs come from `brics info`; the time is the ae-train command's wall
time. Two sets:

- `decoders`: Table 9 of the paper in miniature -- the same encoder, grids and F_mlp decoded by
  `stylegan`, `vqgan` and `movq` (only `ae.decoder` changes).
- `optimiser`: the demo recipe's two departures from the paper's Adam, one at a time.

    python benchmarks/ae_variants.py --set decoders --work runs/variants --out benchmarks/out/decoders_table9.json

Runs are ordinary ae-train run folders: rerunning the script reuses finished runs and resumes
interrupted ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import emit  # benchmarks/common.py (scripts run as `python benchmarks/NAME.py`)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo.yaml"

# Demo-sized versions of each decoder: 16x16 feature block -> 64x64 image. vqgan/movq keep taming's
# layout (mid block with attention, attention at the lowest resolution, nearest x2 + conv) at the
# smallest width GroupNorm(32) allows, 32 channels, with one ResBlock per level (taming: 3) so their
# cost stays within ~2.5x / ~4x of the demo's StyleGAN decoder (`brics info` MACs in the output).
_TAMING_SMALL = ["ae.decoder.ch=32", "ae.decoder.ch_mult=[1,1,1]", "ae.decoder.num_res_blocks=0",
                 "ae.decoder.attn_resolutions=[16]"]
SETS: dict[str, dict[str, list[str]]] = {
    "decoders": {
        "stylegan": [],  # the demo recipe's own decoder
        "vqgan": ["ae.decoder.name=vqgan", *_TAMING_SMALL],
        "movq": ["ae.decoder.name=movq", *_TAMING_SMALL],
    },
    "optimiser": {
        "paper-adam": ["ae.optim.betas=[0.0,0.99]", "ae.optim.grid_lr=null"],  # Suppl. A.2 as is
        "momentum": ["ae.optim.grid_lr=null"],  # beta1 0.9, one lr for everything
        "demo": [],  # momentum + grid tables at 1e-2 (the recipe)
    },
}


def brics(*args: str) -> dict:
    """Run `brics ARGS --json` and return its JSON (stdout); stderr passes through."""
    proc = subprocess.run([sys.executable, "-m", "brics_cli", *args, "--json"], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"brics {' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="shards/demo")
    parser.add_argument("--work", type=Path, default=Path("runs/decoder-table"))
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the demo recipe's)")
    parser.add_argument("--n", type=int, default=256, help="held-out crops to score")
    parser.add_argument("--set", dest="variant_set", choices=sorted(SETS), default="decoders")
    parser.add_argument("--only", default=None, help="comma list of variants of the set (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    common = [f"data.shards={args.shards}"] + ([f"ae.train.steps={args.steps}"] if args.steps else [])
    rows = {}
    variants = SETS[args.variant_set]
    for name in args.only.split(",") if args.only else variants:
        overrides = common + variants[name]
        run = args.work / args.variant_set / name
        info = brics("info", str(RECIPE), *overrides)
        start = time.perf_counter()
        trained = brics("ae-train", str(RECIPE), *overrides, "--out", str(run))
        train_s = time.perf_counter() - start
        scores = brics("reconstruct", "--from", str(run), "--input", args.shards, "--out", str(run / "recon"),
                       "--limit", str(args.n))
        rows[name] = {
            "overrides": variants[name],
            "decoder_params": info["components"]["decoder"]["params"],
            "decoder_macs": info["components"]["decoder"]["macs"],
            "steps": trained["steps"],
            "train_seconds": round(train_s, 1),
            "resumed_from": trained.get("resumed_from"),
            "metrics": {k: v for k, v in scores.items() if k in ("n", "psnr", "ssim", "lpips")},
        }
        print(f"{name}: {json.dumps(rows[name]['metrics'])}", file=sys.stderr)
    report = {
        "benchmark": "ae_variants",
        "set": args.variant_set,
        "recipe": str(RECIPE.relative_to(ROOT)),
        "budget": {k: v for k, v in info["config"]["ae"]["train"].items() if k in ("steps", "batch")}
        | {"optim": info["config"]["ae"]["optim"], "loss": info["config"]["ae"]["loss"]},
        "variants": rows,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
