"""Samplers: key codes from noise with an epsilon-predicting model (paper Sec. 4; DESIGN.md Sec. 4).

Every sampler has the same signature,

    sampler(model, schedule, shape, *, steps, generators, eta=0.0, clip_x0=True, device="cpu", progress=None)
        -> x0 (B, *shape) on [-1, 1] (2z - 1; `loss.x0_to_codes` maps back to key codes)

with `model(x_t, logsnr) -> eps` (x_t (B, *shape), logsnr (B,)) and one CPU `torch.Generator` per
sample (`sample_generator(seed, i)`); the result lands on `device`. Time runs over the uniform
grid t_i = i / steps, i = steps .. 0, of the schedule's continuous t; each step predicts
x0 = (x_t - sigma_t eps) / alpha_t, clamps it to [-1, 1] when `clip_x0` (the codes live in [0, 1];
the authors' sampler does the same) and moves to the next t. The last step returns that x0
prediction itself (gamma(0) = 1: no noise is left).

Reproducibility: sample i draws every random number it uses -- its initial noise and the noise of
each step -- from `generators[i]` alone, on the CPU, and every operation of the update is
elementwise with per-step scalar coefficients. So sample i depends only on (model, schedule,
sampler settings, generator i): not on the batch size, on which other samples share its batch,
or on the device the noise ends up on -- provided the model itself is batch-invariant (the UNet
uses no batch statistics). `sample_generator(seed, index)` makes generator i of a run.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
from torch import Tensor

from brics_cli.diffusion.loss import EpsModel
from brics_cli.diffusion.schedules import Schedule
from brics_cli.registry import SAMPLERS

Progress = Callable[[int, int], None]  # (steps done, total steps)


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample `index` in a run with `seed`: SHA-256 of both, so neighbouring
    (seed, index) pairs give unrelated streams and the mapping never changes between versions."""
    digest = hashlib.sha256(f"brics-sample:{int(seed)}:{int(index)}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [sample_generator(seed, i) for i in indices]


def _per_sample_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device | str) -> Tensor:
    """(B, *shape) standard normal, row i drawn from generators[i] on the CPU."""
    rows = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device)


def _time_grid(schedule: Schedule, steps: int) -> tuple[list[float], list[float]]:
    """gamma and logSNR at t_i = i / steps, i = 0..steps, as Python floats (computed in float64)."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    return schedule.gamma(t).tolist(), schedule.logsnr(t).tolist()


def _predict(model: EpsModel, x: Tensor, logsnr: float, g_t: float, clip_x0: bool) -> tuple[Tensor, Tensor]:
    """(x0, eps) predicted at noise level gamma = g_t; with clipping, eps is re-derived from the clamped x0
    so that both stay consistent with x_t = alpha x0 + sigma eps."""
    alpha, sigma = g_t**0.5, (1.0 - g_t) ** 0.5
    eps = model(x, torch.full((x.shape[0],), logsnr, dtype=x.dtype, device=x.device))
    x0 = (x - sigma * eps) / alpha
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x - alpha * x0) / sigma
    return x0, eps


def _check(steps: int, generators: Sequence[torch.Generator]) -> None:
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps}")
    if len(generators) == 0:
        raise ValueError("a sampler needs one generator per sample; got none")


def _loop(
    step: Callable[[Tensor, Tensor, Tensor, float, float], Tensor],
    model: EpsModel,
    schedule: Schedule,
    shape: Sequence[int],
    steps: int,
    generators: Sequence[torch.Generator],
    clip_x0: bool,
    device: torch.device | str,
    progress: Progress | None,
) -> Tensor:
    """The loop every sampler shares: x_1 ~ N(0, I), then `step(x_t, x0, eps, g_t, g_s)` from t_i to t_{i-1}."""
    _check(steps, generators)
    gammas, logsnrs = _time_grid(schedule, steps)
    x = _per_sample_noise(shape, generators, device)  # (B, *shape) = x at t = 1
    with torch.no_grad():
        for i in range(steps, 0, -1):
            g_t, g_s = gammas[i], gammas[i - 1]
            x0, eps = _predict(model, x, logsnrs[i], g_t, clip_x0)
            x = x0 if i == 1 else step(x, x0, eps, g_t, g_s)
            if progress is not None:
                progress(steps - i + 1, steps)
    return x


@SAMPLERS.register("ddpm")
def ddpm(
    model: EpsModel,
    schedule: Schedule,
    shape: Sequence[int],
    *,
    steps: int,
    generators: Sequence[torch.Generator],
    eta: float = 0.0,
    clip_x0: bool = True,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> Tensor:
    """Ancestral sampling, Ho et al. 2020 Eq. 6-7: x_s ~ q(x_s | x_t, x0_hat), the Gaussian posterior.

    `eta` does not apply (the ancestral sampler is DDIM's eta = 1); it must be 0.
    """
    if eta != 0:
        raise ValueError(f"eta applies to the ddim sampler only; ddpm got eta={eta}")

    def step(x: Tensor, x0: Tensor, eps: Tensor, g_t: float, g_s: float) -> Tensor:
        beta = 1.0 - g_t / g_s  # 1 - alpha_{t|s}^2, the variance added between s and t
        mean = (g_s**0.5 * beta / (1.0 - g_t)) * x0 + ((g_t / g_s) ** 0.5 * (1.0 - g_s) / (1.0 - g_t)) * x
        var = beta * (1.0 - g_s) / (1.0 - g_t)
        return mean + var**0.5 * _per_sample_noise(x.shape[1:], generators, x.device)

    return _loop(step, model, schedule, shape, steps, generators, clip_x0, device, progress)


@SAMPLERS.register("ddim")
def ddim(
    model: EpsModel,
    schedule: Schedule,
    shape: Sequence[int],
    *,
    steps: int,
    generators: Sequence[torch.Generator],
    eta: float = 0.0,
    clip_x0: bool = True,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> Tensor:
    """DDIM, Song et al. 2021 Eq. 12: x_s = alpha_s x0 + sqrt(1 - g_s - s^2) eps + s z,
    s = eta sqrt((1 - g_s)/(1 - g_t)) sqrt(1 - g_t/g_s); eta = 0 is deterministic given x_1."""
    if eta < 0:
        raise ValueError(f"ddim eta must be >= 0, got {eta}")

    def step(x: Tensor, x0: Tensor, eps: Tensor, g_t: float, g_s: float) -> Tensor:
        s2 = eta**2 * (1.0 - g_s) / (1.0 - g_t) * (1.0 - g_t / g_s)
        x = g_s**0.5 * x0 + max(1.0 - g_s - s2, 0.0) ** 0.5 * eps
        if s2 > 0:
            x = x + s2**0.5 * _per_sample_noise(x.shape[1:], generators, x.device)
        return x

    return _loop(step, model, schedule, shape, steps, generators, clip_x0, device, progress)
