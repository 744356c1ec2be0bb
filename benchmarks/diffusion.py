"""The diffusion UNet against diffusers' UNet2DModel, and sampling throughput with the demo models.

1. UNet forward + backward at the paper's configuration (Suppl. A.5: 64x64x4 code, model channels
   256, multipliers 1-2-3-4, 2 res blocks, attention at 32/16/8 with 32-channel heads), batch 1,
   against diffusers' `UNet2DModel` built with the same width, depth and attention, timed
   round-robin in this process. Target: brics <= 1.1x diffusers. Parameters and MACs
   (torch.utils.flop_counter on the meta device) of both.
2. Training the demo recipe's UNet with its optimiser settings on proxy key codes (smooth random
   fields through a sigmoid: 16x16x4, in [0,1], spatially correlated), for `--train-steps` steps:
   seconds per step and the epsilon MSE at the start and the end.
3. Sampling with the demo recipe's UNet (16x16x4 codes, randomly initialised): codes/s of the
   `ddim` and `ddpm` step loops, and images/s including decoding through a randomly initialised
   demo autoencoder (64x64 images). Throughput does not depend on the weights.

Needs diffusers for (1) (`pip install -e '.[bench]'`).

    python benchmarks/diffusion.py --out benchmarks/out/diffusion.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from common import emit  # benchmarks/common.py (scripts run as `python benchmarks/NAME.py`)

ROOT = Path(__file__).resolve().parents[1]


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paper_unets():
    from diffusers import UNet2DModel

    from brics_cli.models.unet import UNet
    from brics_cli.recipe import load_recipe

    cfg = load_recipe(ROOT / "recipes/church.yaml").diffusion.model
    ours = UNet(cfg, 4, 64)
    theirs = UNet2DModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=cfg.num_res_blocks,
        block_out_channels=tuple(cfg.level_channels()),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=cfg.num_head_channels, norm_num_groups=cfg.norm_groups,
    )
    return cfg, ours, theirs


def unet_comparison(repeats: int) -> dict:
    from brics_cli.models.summary import count_macs, unet_report

    cfg, ours, theirs = paper_unets()
    x, logsnr, t = torch.randn(1, 4, 64, 64), torch.zeros(1), torch.full((1,), 500)
    runs = {
        "brics": lambda: ours(x, logsnr).square().mean().backward(),
        "diffusers": lambda: theirs(x, t).sample.square().mean().backward(),
    }
    for fn in runs.values():  # warm-up (oneDNN primitive caches)
        fn()
    samples = {k: [] for k in runs}
    for _ in range(repeats):  # round-robin: both see the same machine load
        for name, fn in runs.items():
            samples[name].append(timed(fn))
    seconds = {k: statistics.median(v) for k, v in samples.items()}
    with torch.device("meta"):
        _, _, meta_theirs = paper_unets()
        xm, tm = torch.zeros(1, 4, 64, 64), torch.zeros(1)
    return {
        "config": {"code": [4, 64, 64], "batch": 1, "model_channels": cfg.model_channels,
                   "channel_mult": list(cfg.channel_mult), "num_res_blocks": cfg.num_res_blocks,
                   "attention_resolutions": list(cfg.attention_resolutions), "head_channels": cfg.num_head_channels},
        "forward_backward_seconds": seconds,
        "all_seconds": samples,
        "ratio_brics_vs_diffusers": seconds["brics"] / seconds["diffusers"],
        "params": {"brics": params(ours), "diffusers": params(theirs)},
        "macs": {"brics": unet_report(cfg, 4, 64)["macs"], "diffusers": count_macs(lambda: meta_theirs.eval()(xm, tm))},
    }


def proxy_codes(n: int, channels: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random fields in [0,1]: bilinear up-sampling of 4x4 noise, through a sigmoid."""
    coarse = torch.randn(n, channels, 4, 4, generator=generator) * 2
    return torch.sigmoid(torch.nn.functional.interpolate(coarse, size=resolution, mode="bilinear", align_corners=False))


def demo_training(steps: int) -> dict:
    from brics_cli.diffusion.config import build_optimizer
    from brics_cli.diffusion.loss import codes_to_x0, diffusion_loss
    from brics_cli.diffusion.schedules import build_schedule
    from brics_cli.models.unet import UNet
    from brics_cli.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes/demo.yaml")
    C, R, cfg = recipe.ae.code.channels, recipe.ae.code.resolution, recipe.diffusion
    torch.manual_seed(0)
    unet, schedule = UNet(cfg.model, C, R), build_schedule(cfg.schedule)
    optimizer, lr_schedule = build_optimizer(cfg.optim, unet.parameters())
    g = torch.Generator().manual_seed(0)
    pool = codes_to_x0(proxy_codes(4096, C, R, g))
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        batch = pool[torch.randint(len(pool), (cfg.train.batch,), generator=g)]
        loss, terms = diffusion_loss(unet, schedule, batch, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        losses.append(terms["mse"].item())
    seconds = time.perf_counter() - start
    k = max(1, steps // 10)
    return {"steps": steps, "batch": cfg.train.batch, "seconds_per_step": seconds / steps,
            "mse_first_tenth": statistics.mean(losses[:k]), "mse_last_tenth": statistics.mean(losses[-k:]),
            "recipe_steps": cfg.train.steps, "recipe_minutes_estimate": seconds / steps * cfg.train.steps / 60}


def sampling_throughput(batch: int, steps: int, repeats: int) -> dict:
    from brics_cli.diffusion.loss import x0_to_codes
    from brics_cli.diffusion.samplers import ddim, ddpm, sample_generators
    from brics_cli.diffusion.schedules import build_schedule
    from brics_cli.models.autoencoder import BRICSAutoencoder
    from brics_cli.models.unet import UNet
    from brics_cli.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes/demo.yaml")
    C, R = recipe.ae.code.channels, recipe.ae.code.resolution
    unet = UNet(recipe.diffusion.model, C, R).eval()
    for p in unet.parameters():  # leave the zero-initialised output layers: a trained model's cost
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
    ae = BRICSAutoencoder(recipe.ae, recipe.data.resolution).eval()
    schedule = build_schedule(recipe.diffusion.schedule)
    result = {"unet_params": params(unet), "code": [C, R, R], "image": recipe.data.resolution, "batch": batch, "steps": steps}
    samplers = {"ddim": ddim, "ddpm": ddpm}
    codes = {}

    def sample(name: str) -> None:
        codes[name] = x0_to_codes(samplers[name](unet, schedule, (C, R, R), steps=steps, generators=sample_generators(0, range(batch))))

    def decode() -> None:
        with torch.no_grad():
            ae.decode(codes["ddim"])

    runs = {"ddim": lambda: sample("ddim"), "ddpm": lambda: sample("ddpm"), "decode": decode}
    for fn in runs.values():  # warm-up
        fn()
    samples = {k: [] for k in runs}
    for _ in range(repeats):  # round-robin, medians: the machine's load moves
        for name, fn in runs.items():
            samples[name].append(timed(fn))
    seconds = {k: statistics.median(v) for k, v in samples.items()}
    result["decode_seconds_per_batch"] = seconds["decode"]
    for name in samplers:
        result[name] = {
            "seconds_per_batch": seconds[name],
            "seconds_per_step": seconds[name] / steps,
            "codes_per_s": batch / seconds[name],
            "images_per_s_with_decode": batch / (seconds[name] + seconds["decode"]),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="round-robin rounds of the paper UNets")
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=100, help="demo UNet training steps to time")
    parser.add_argument("--skip-paper", action="store_true", help="only the sampling throughput (no diffusers needed)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = {"benchmark": "diffusion"}
    if not args.skip_paper:
        report["unet_paper_config"] = unet_comparison(args.repeats)
    report["training_demo"] = demo_training(args.train_steps)
    report["sampling_demo"] = sampling_throughput(args.sample_batch, args.sample_steps, 3)
    report["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    emit(report, args.out)


if __name__ == "__main__":
    main()
