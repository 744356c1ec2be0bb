"""GPU throughput of the training stages and of sampling, in fp32 and bf16, with and without compile.

For each configuration: median seconds per optimiser step (after warm-up steps, which absorb
torch.compile's compilation), images or codes per second, and the peak memory allocated.

- ae-train: one full step of `AETrainer.train_step` (generator + WGAN-GP discriminator, both Adam
  updates, EMA) on the church recipe at 256x256, `ae.train.bf16` on/off, `ae.train.compile` on/off;
- diffusion-train: one step of `DiffusionTrainer.train_step` (the paper's 358M-parameter UNet on
  64x64x4 codes), `diffusion.train.bf16` on/off, `diffusion.train.compile` on/off;
- sampling: DDIM codes per second with the EMA UNet (batch 64, 50 steps).

`--smoke` runs the same code on the CPU with the tests' tiny recipe and two steps, so the script
is known to work before a GPU is ever lent (tests/test_gpu_check.py).

    python benchmarks/gpu_bench.py --out benchmarks/out/gpu_bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from pathlib import Path

import torch

from common import emit  # benchmarks/common.py (scripts run as `python benchmarks/NAME.py`)

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median seconds of `step()` after `warmup` calls, and the peak memory of the timed calls."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"step_s": statistics.median(times), "all_s": times, "peak_gib": peak}


def ae_train(recipe_path: Path, device, batch: int, bf16: bool, compile_: bool, warmup: int, repeats: int) -> dict:
    from brics_cli.core.runtime import Runtime
    from brics_cli.recipe import load_recipe
    from brics_cli.train.ae import AETrainer

    recipe = load_recipe(recipe_path, ["ae.loss.perceptual_type=none", f"ae.train.batch={batch}", f"ae.train.bf16={str(bf16).lower()}",
                                       f"ae.train.compile={str(compile_).lower()}"])
    trainer = AETrainer(recipe, Path("/tmp/brics-gpu-bench-ae"), Runtime(device))
    trainer.step = recipe.ae.loss.gan_start  # the adversarial terms on, as in most of a run
    R = recipe.data.resolution
    x = [torch.rand(batch, 3, R, R, device=device) * 2 - 1]
    result = measure(lambda: trainer.train_step(x), device, warmup, repeats)
    return result | {"images_per_s": batch / result["step_s"], "resolution": R, "batch": batch}


def diffusion_trainer(recipe_path: Path, device, batch: int, overrides: list[str]):
    from brics_cli.core.runtime import Runtime
    from brics_cli.recipe import load_recipe
    from brics_cli.train.diffusion import DiffusionTrainer

    recipe = load_recipe(recipe_path, [f"diffusion.train.batch={batch}", *overrides])
    code = recipe.ae.code
    codes = torch.rand(4 * batch, code.channels, code.resolution, code.resolution).half()
    return DiffusionTrainer(recipe, Path("/tmp/brics-gpu-bench-diffusion"), Runtime(device), Path("none"), codes, {})


def diffusion_train(recipe_path: Path, device, batch: int, bf16: bool, compile_: bool, warmup: int, repeats: int) -> dict:
    # The trainer's own flags, as a recipe sets them (bf16 autocasts on CUDA only).
    trainer = diffusion_trainer(recipe_path, device, batch, [f"diffusion.train.bf16={str(bf16).lower()}",
                                                            f"diffusion.train.compile={str(compile_).lower()}"])
    result = measure(trainer.train_step, device, warmup, repeats)
    return result | {"codes_per_s": batch / result["step_s"], "batch": batch,
                     "params": sum(p.numel() for p in trainer.unet.parameters())}


@torch.no_grad()
def sampling(recipe_path: Path, device, batch: int, steps: int, bf16: bool, repeats: int) -> dict:
    from brics_cli.diffusion.samplers import sample_generators
    from brics_cli.registry import SAMPLERS

    trainer = diffusion_trainer(recipe_path, device, batch, [])
    unet = trainer.ema.module.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    ddim = SAMPLERS.get("ddim")

    def run():
        with autocast:
            ddim(unet, trainer.schedule, trainer.shape, steps=steps, generators=sample_generators(0, range(batch)), eta=0.0,
                 clip_x0=True, device=device)

    result = measure(run, device, 1, repeats)
    return result | {"codes_per_s": batch / result["step_s"], "batch": batch, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, the tests' tiny recipe, two steps: checks the script works")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        device, recipe, repeats, warmup = torch.device("cpu"), ROOT / "tests/recipes/tiny.yaml", 2, 1
        ae_batch, diff_batch, sample_batch, sample_steps, compiles = 2, 4, 4, 2, (False,)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_bench.py: no CUDA device visible (use --smoke on a CPU machine)")
        device, recipe, repeats, warmup = torch.device("cuda"), ROOT / "recipes/church.yaml", args.repeats, 3
        ae_batch, diff_batch, sample_batch, sample_steps, compiles = 12, 64, 64, 50, (False, True)
    torch.manual_seed(0)
    report: dict = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "device": str(device),
                                "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
                    "smoke": args.smoke, "recipe": str(recipe.relative_to(ROOT)), "ae_train": {}, "diffusion_train": {},
                    "sampling": {}}
    for compile_ in compiles:
        for bf16 in (False, True):
            name = f"{'bf16' if bf16 else 'fp32'}{'_compile' if compile_ else ''}"
            report["ae_train"][name] = ae_train(recipe, device, ae_batch, bf16, compile_, warmup, repeats)
            report["diffusion_train"][name] = diffusion_train(recipe, device, diff_batch, bf16, compile_, warmup, repeats)
            print(f"{name}: ae-train {report['ae_train'][name]['images_per_s']:.1f} img/s, "
                  f"diffusion-train {report['diffusion_train'][name]['codes_per_s']:.1f} codes/s", flush=True)
    for bf16 in (False, True):
        report["sampling"]["bf16" if bf16 else "fp32"] = sampling(recipe, device, sample_batch, sample_steps, bf16, min(repeats, 3))
    emit(report, args.out)


if __name__ == "__main__":
    main()
