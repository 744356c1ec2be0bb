"""Autoencoder training-step and decode time at 256x256, and the retrieval module's training memory.

1. One full ae-train step (generator forward/backward with L2 + WGAN, discriminator step with the
   gradient penalty, both Adam updates, EMA) of the paper configuration (recipes/church.yaml,
   64x64x4 codes, 18.6M grid parameters), batch 2, on this machine's device -- and the same step
   without the adversarial terms, to show what the discriminator costs.
2. Decode time (grids + F_mlp + decoder) of 64x64x4 codes to 256x256 images, batch 2.
3. Peak memory of the retrieval module (grids + F_mlp) forward+backward at batch 1 and 2
   (paper Sec. 4: 91.2 MB and 126.05 MB; target <= 100 MB at batch 1).

    python benchmarks/ae.py --out benchmarks/out/ae.json
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


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from brics_cli.models.summary import retrieval_training_memory
    from brics_cli.recipe import load_recipe
    from brics_cli.train.ae import AETrainer
    from brics_cli.core.runtime import Runtime, resolve_device

    device = resolve_device(args.device)
    torch.manual_seed(0)
    B = args.batch
    results: dict = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                                 "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
                                 "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
                     "batch": B}
    x = [(torch.rand(B, 3, 256, 256, device=device) * 2 - 1)]
    for gan in ("wgan-gp", "none"):
        recipe = load_recipe(ROOT / "recipes/church.yaml", [f"ae.loss.gan={gan}", "ae.loss.perceptual_type=none",
                                                            f"ae.train.batch={B}"])
        trainer = AETrainer(recipe, Path("/tmp/brics-bench-ae"), Runtime(device))
        times = timed(lambda: trainer.train_step(x), args.repeats)
        results[f"train_step_s_{gan.replace('-', '_')}"] = statistics.median(times)
        results[f"train_step_all_s_{gan.replace('-', '_')}"] = times
    model = trainer.ema.module.eval()
    z = torch.rand(B, 4, 64, 64, device=device)
    with torch.no_grad():
        decode = timed(lambda: model.decode(z), args.repeats)
    results["decode_s"] = statistics.median(decode)
    results["decode_images_per_s"] = B / results["decode_s"]
    # The paper's measure (Suppl. C): what the step allocates (activations, saved tensors, the table
    # gradient), the tables themselves excluded. `auto` trains with the separable path; `gather` is
    # the low-memory choice.
    for interpolation in ("auto", "gather"):
        recipe = load_recipe(ROOT / "recipes/church.yaml", [f"ae.grid.interpolation={interpolation}"])
        for batch in (1, 2):
            mem = retrieval_training_memory(recipe.ae, 256, batch, str(device))
            results[f"retrieval_memory_{interpolation}_batch{batch}_mib"] = mem["step_peak_bytes"] / 2**20
            results[f"retrieval_memory_{interpolation}_batch{batch}"] = mem
    results["paper_retrieval_memory_mb"] = {"batch1": 91.2, "batch2": 126.05}
    emit(results, args.out)


if __name__ == "__main__":
    main()
