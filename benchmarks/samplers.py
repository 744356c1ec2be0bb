"""Samplers on the demo model: quality against UNet evaluations (NFE) for ddpm, ddim, dpm-solver++ and heun.

    brics demo --out runs/demo-pipeline          # once: a trained demo pipeline (~5-8 minutes on 2 cores)
    python benchmarks/samplers.py --run runs/demo-pipeline/run/diffusion --out benchmarks/out/samplers.json

Every sampler starts sample i from the same noise (`sample_generator(seed, i)`), with the recipe's
`clip_x0`, on the EMA UNet; NFE is counted (`samplers.count_nfe`), not assumed. Two distances, both
free of pretrained weights (so the benchmark runs anywhere, and needs no Inception file):

(a) `rms`: the RMS difference, in key-code units (z in [0, 1], what the decoder reads), between a
    sampler's codes and the codes a 1000-step DDIM reaches from the same noise. DDIM with eta = 0
    is Euler's method on the probability-flow ODE (Song et al. 2021, Sec. 4.3), the ODE that
    dpm-solver++ and heun integrate too, so `rms` is each solver's integration error: how far the
    images move away from the converged ones when the steps are cut -- per sample, with no
    sampling noise in the number. The reference is first order, so it has an error of its own:
    `reference.solver_agreement` is the RMS between the two most accurate second-order settings
    (dpm-solver++ 100 steps, heun 50): where that is well below their `rms`, the remaining `rms` is
    mostly the reference's, and differences below it are not resolved. Not defined for ddpm: the
    ancestral chain is another (stochastic) process, which lands on another sample from the same
    noise however many steps it takes.
(b) `code_fd`: the Frechet distance between features of the sampled codes and of held-out codes,
    the val split encoded with the run's EMA autoencoder -- the distribution-level distance, for
    every sampler including ddpm. The features are those of the in-training curve
    (`brics_cli.train.eval_curve.code_features`), so the numbers compare with `metrics.jsonl`'s
    `code_fd`: with 64 samples a 16x16x4 code flattened is 1024-d and its covariance has rank 63,
    which makes the Frechet distance mostly bias, so each code is cut into p x p patches with
    C p^2 < n (here 2x2 patches: 16-d vectors, 64 per code), whose statistics keep the joint law
    of neighbouring code values. `fd_floor`: the same distance for `--samples` codes of the training
    set (the run's code cache) instead of samples, mean and std over 5 draws: what a perfect model
    of the training set scores at this sample count, and how much the number moves by chance.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import emit  # benchmarks/common.py (scripts run as `python benchmarks/NAME.py`)

STEPS = {  # sampler -> step counts; heun's NFE is about twice its steps
    "ddpm": [10, 25, 50, 100],
    "ddim": [5, 10, 20, 50, 100],
    "dpm-solver++": [5, 10, 20, 50, 100],
    "heun": [3, 5, 10, 25, 50],
}
REFERENCE = ("ddim", 1000)


def load(run: Path):
    from brics_cli.config import build
    from brics_cli.data.config import DataConfig
    from brics_cli.diffusion.model import DiffusionModel
    from brics_cli.runs import find_checkpoint

    path = find_checkpoint(run, "diffusion")
    model = DiffusionModel.from_checkpoint(path, ema=True)
    return path, model, build(DataConfig, model.meta["config"]["data"], "data")


def held_out_codes(model, data_cfg) -> torch.Tensor:
    """The val split through the run's EMA autoencoder: (N, C, H, W) codes in [0, 1], float16 as the cache."""
    from brics_cli.data.loader import ShardDataset
    from brics_cli.models.autoencoder import BRICSAutoencoder

    ae = BRICSAutoencoder.from_checkpoint(Path(model.meta["ae_checkpoint"]), ema=True)
    cfg = replace(data_cfg, workers=0, shuffle=0, flip=False, resample=False, epoch_length=None)
    images = [image for image, _ in ShardDataset(cfg, "val")]
    with torch.no_grad():
        return torch.cat([ae.encode(torch.stack(images[i:i + 64]))[0] for i in range(0, len(images), 64)]).half()


def training_codes(model, data_cfg) -> torch.Tensor:
    from brics_cli.train.diffusion import codes_key, read_code_cache

    folder = Path(model.meta["config"]["run"]["dir"]) / "codes" / codes_key(Path(model.meta["ae_checkpoint"]), data_cfg.shards, data_cfg.flip)
    return read_code_cache(folder)[0]


def sample_codes(model, sampler: str, steps: int, n: int, seed: int, clip_x0: bool) -> tuple[torch.Tensor, float]:
    """(n, C, H, W) float32 codes in [0, 1] from sampler, and the seconds it took (all n in one batch)."""
    from brics_cli.diffusion.loss import x0_to_codes
    from brics_cli.diffusion.samplers import sample_generators
    from brics_cli.registry import SAMPLERS

    t0 = time.perf_counter()
    x0 = SAMPLERS.get(sampler)(model.unet, model.schedule, model.code_shape, steps=steps,
                               generators=sample_generators(seed, range(n)), clip_x0=clip_x0)
    return x0_to_codes(x0), time.perf_counter() - t0


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).square().mean().sqrt().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo-pipeline/run/diffusion"), help="a diffusion run (brics demo's)")
    parser.add_argument("--samples", type=int, default=64, help="codes per sampler setting (one batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: two step counts per sampler, a 50-step reference")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from brics_cli.diffusion.samplers import count_nfe
    from brics_cli.eval.metrics import feature_statistics, frechet_distance
    from brics_cli.train.eval_curve import code_features, code_patch, describe_features

    t_start = time.perf_counter()
    checkpoint, model, data_cfg = load(args.run)
    clip_x0 = model.config.sample.clip_x0
    held_out, train = held_out_codes(model, data_cfg), training_codes(model, data_cfg)
    patch = code_patch(model.code_shape, min(args.samples, len(held_out)))
    reference_stats = feature_statistics(code_features(held_out, patch))

    def code_fd(codes: torch.Tensor) -> float:  # rounded to float16 like the held-out (and cached) codes
        return frechet_distance(*feature_statistics(code_features(codes.half(), patch)), *reference_stats)

    draws = [train[torch.randperm(len(train), generator=torch.Generator().manual_seed(k))[:args.samples]] for k in range(5)]
    floor = [code_fd(d) for d in draws]

    def setting(sampler: str, steps: int) -> tuple[torch.Tensor, dict]:
        codes, seconds = sample_codes(model, sampler, steps, args.samples, args.seed, clip_x0)
        row = {"sampler": sampler, "steps": steps, "nfe": count_nfe(sampler, model.schedule, steps),
               "code_fd": round(code_fd(codes), 5), "seconds": round(seconds, 2)}
        print(f"{sampler:>12} {steps:>5} steps  NFE {row['nfe']:>4}  code_fd {row['code_fd']:.4f}  {seconds:.1f} s", file=sys.stderr)
        return codes, row

    plan = {name: counts[:2] for name, counts in STEPS.items()} if args.quick else STEPS
    ref_codes, ref_row = setting(REFERENCE[0], 50 if args.quick else REFERENCE[1])
    rows, finest = [], {}
    for sampler, step_counts in plan.items():
        for steps in step_counts:
            codes, row = setting(sampler, steps)
            if sampler != "ddpm":
                row["rms"] = round(rms(codes, ref_codes), 6)
            rows.append(row)
            finest[sampler] = (steps, codes)  # the last (most steps) of each sampler
    (dpm_steps, dpm_codes), (heun_steps, heun_codes) = finest["dpm-solver++"], finest["heun"]
    ref_row["solver_agreement"] = {"between": [f"dpm-solver++ {dpm_steps}", f"heun {heun_steps}"],
                                   "rms": round(rms(dpm_codes, heun_codes), 6)}
    report = {
        "benchmark": "samplers",
        "run": str(args.run), "checkpoint": str(checkpoint), "step": model.meta.get("step"),
        "samples": args.samples, "seed": args.seed, "clip_x0": clip_x0, "code_shape": list(model.code_shape),
        "features": describe_features(model.code_shape, patch), "held_out_codes": len(held_out), "training_codes": len(train),
        "fd_floor": {"mean": round(statistics.mean(floor), 5), "std": round(statistics.stdev(floor), 5),
                     "draws": [round(f, 5) for f in floor]},
        "reference": ref_row,
        "rows": rows,
        "seconds": round(time.perf_counter() - t_start, 1),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
