"""Decode wall time and size: BRICS (retrieval + `stylegan`) vs the `vqgan` plugin, and the plugin vs diffusers.

1. Decode at 256x256, batch 2: BRICS from 64x64x4 key codes (grids + F_mlp + StyleGAN2 decoder,
   recipes/church.yaml) against the `vqgan` plugin configured as taming's f16 decoder from a
   16x16x256 latent (Table 3's comparison). Target: BRICS <= 0.6x VQGAN's time. Also BRICS through
   the per-sample-weights (grouped conv) path that decoding used before the inference path.
2. The `vqgan` plugin against diffusers' `VQModel` decoder of the same structure (f16 channels,
   attention in the mid block only, as diffusers builds it): parameters within 1%, wall time
   <= 1.2x -- the baseline of (1) is a fair one, not a slow one.

Needs the brics-vqgan plugin and diffusers (`pip install diffusers`, benchmark only).

    python benchmarks/decoders.py --out benchmarks/out/decoders.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from common import emit  # benchmarks/common.py (scripts run as `python benchmarks/NAME.py`)


def median_time(fn, repeats: int) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    from diffusers import VQModel

    from brics_cli.models.autoencoder import BRICSAutoencoder
    from brics_cli.recipe import load_recipe
    from brics_cli.registry import DECODERS

    B = args.batch
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes/church.yaml")
    brics = BRICSAutoencoder(recipe.ae, 256).eval()
    z = torch.rand(B, 4, 64, 64)
    VQGAN = DECODERS.get("vqgan")
    vqgan_f16 = VQGAN(VQGAN.Config(), 256, 16, 256).eval()  # taming f16: ch 128, [1,1,2,2,4], attn at 16
    vqgan_mid = VQGAN(VQGAN.Config(attn_resolutions=[]), 256, 16, 256).eval()  # diffusers' structure
    latent = torch.randn(B, 256, 16, 16)
    diffusers_vq = VQModel(
        in_channels=3, out_channels=3, latent_channels=256, num_vq_embeddings=1024, layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5,
    ).decoder.eval()

    def brics_decode_grouped():
        """What decode ran before the inference path: per-sample weights, one grouped conv per layer."""
        f = brics.features(z)
        return brics.decoder._synthesize(f, brics.decoder.style(f))

    # Round-robin repeats of each (every timed call right after an untimed one), medians.
    runs = {
        "brics_decode": lambda: brics.decode(z),
        "brics_decode_grouped": brics_decode_grouped,
        "vqgan_f16": lambda: vqgan_f16(latent),
        "vqgan_diffusers_structure": lambda: vqgan_mid(latent),
        "diffusers_vqmodel_decoder": lambda: diffusers_vq(latent),
    }
    samples = {k: [] for k in runs}
    for fn in runs.values():  # one untimed round first: the process's first calls run slower
        median_time(fn, 1)
    for _ in range(args.repeats):
        for name, fn in runs.items():
            samples[name].append(median_time(fn, 1))
    times = {k: statistics.median(v) for k, v in samples.items()}
    report = {
        "benchmark": "decoders",
        "batch": B,
        "seconds": times,
        "samples": samples,
        "params": {
            "brics_decode": params(brics.retrieval) + params(brics.decoder),
            "brics_decode_grouped": params(brics.retrieval) + params(brics.decoder),
            "vqgan_f16": params(vqgan_f16),
            "vqgan_diffusers_structure": params(vqgan_mid),
            "diffusers_vqmodel_decoder": params(diffusers_vq),
        },
        "ratios": {
            "brics_vs_vqgan_f16_time": times["brics_decode"] / times["vqgan_f16"],
            "brics_inference_path_vs_grouped_time": times["brics_decode"] / times["brics_decode_grouped"],
            "plugin_vs_diffusers_time": times["vqgan_diffusers_structure"] / times["diffusers_vqmodel_decoder"],
        },
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    report["ratios"]["plugin_vs_diffusers_params"] = report["params"]["vqgan_diffusers_structure"] / report["params"]["diffusers_vqmodel_decoder"]
    emit(report, args.out)


if __name__ == "__main__":
    main()
