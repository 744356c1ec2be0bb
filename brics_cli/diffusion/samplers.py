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

The samplers and their cost in UNet evaluations (NFE) for `steps` = N:

    ddpm          ancestral (Ho et al. 2020)                      N     stochastic
    ddim          Song et al. 2021; eta = 0: Euler on the ODE     N     deterministic at eta = 0
    dpm-solver++  DPM-Solver++(2M), Lu et al. 2022                N     deterministic, 2nd order
    heun          Karras et al. 2022, Algorithm 1                 2N-1  deterministic, 2nd order
                  (2N-2 where gamma(1) is clipped: the cosine schedules; see `heun`)

`count_nfe` counts them for any registered sampler. The two ODE solvers work with lambda =
log(alpha / sigma) = logSNR / 2 and the EDM noise level sigma_ve = sigma / alpha = exp(-lambda).
Their coefficients are Python floats, computed in float64 from the schedule's float64 gamma and
logSNR and only then applied to the float32 tensors: in float32, 1 - gamma near t = 0 keeps few
digits (cosine: 1 - gamma(1e-3) = 4.1e-5, which float32 holds to ~1e-3), and it sets sigma_s / sigma_t and h =
lambda_s - lambda_t; at t = 1 logSNR is finite (-20.7) only through the 1e-9 clip; exp(-h) - 1
and exp(h) - 1 are taken with `expm1`, exact for the small h of many steps. Heun is written in
x = alpha y rather than in y = x / alpha itself, which holds values ~3e4 at t = 1 whose low digits
float32 would lose; the rearrangement is exact algebra (see `heun`).

Order: both are second order in the step of lambda (DPM-Solver++) or sigma_ve (Heun), which is
what they show on a schedule with uniform lambda steps (tests/test_samplers_fast.py: error x1/4
per doubling). On the uniform t grid of cosine-variant, sigma^2 ~ 1.2 t near t = 0, so the last
steps keep h ~ 1/2 log(i / (i - 1)) however many steps there are, and the observed order on a
Gaussian drops to ~1-1.5 (still 5-10x below DDIM's error at equal steps).
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from brics_cli.diffusion.loss import EpsModel
from brics_cli.diffusion.schedules import GAMMA_MIN, Schedule
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


def _takes_no_eta(name: str, eta: float) -> None:
    if eta != 0:
        raise ValueError(f"eta applies to the ddim sampler only; {name} got eta={eta}")


@SAMPLERS.register("dpm-solver++")
def dpm_solver_pp(
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
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095) Algorithm 2: x_s = (sigma_s/sigma_t) x_t
    - alpha_s (exp(-h) - 1) D, D = (1 + 1/2r) D_t - 1/2r D_prev (D_t alone on the first step); NFE = steps."""
    _takes_no_eta("dpm-solver++", eta)
    _check(steps, generators)
    gammas, logsnrs = _time_grid(schedule, steps)
    lam = [0.5 * l for l in logsnrs]  # lambda_i = log(alpha_i / sigma_i)
    x = _per_sample_noise(shape, generators, device)  # (B, *shape) = x at t = 1
    d_prev, h_prev = None, None  # the x0 prediction and the lambda step of the previous step
    with torch.no_grad():
        for i in range(steps, 0, -1):
            g_t, g_s = gammas[i], gammas[i - 1]
            d, _ = _predict(model, x, logsnrs[i], g_t, clip_x0)  # D_t, the (clamped) x0 prediction
            if i == 1:
                x = d
            else:
                h = lam[i - 1] - lam[i]
                if d_prev is None:
                    D = d
                else:
                    r = h_prev / h
                    D = (1.0 + 0.5 / r) * d - (0.5 / r) * d_prev
                x = ((1.0 - g_s) / (1.0 - g_t)) ** 0.5 * x - (g_s**0.5 * math.expm1(-h)) * D
                d_prev, h_prev = d, h
            if progress is not None:
                progress(steps - i + 1, steps)
    return x


@SAMPLERS.register("heun")
def heun(
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
    """Heun's 2nd-order method, Karras et al. 2022 (EDM) Algorithm 1, on y = x/alpha and sigma_ve = sigma/alpha:
    Euler, then the trapezoid of dy/dsigma_ve = (y - D)/sigma_ve; `steps` intervals, NFE = 2 per interval but the last.

    In x: Euler is x_e = (sigma_s/sigma_t) x_t + alpha_s (1 - e^-h) D_t (DDIM's step), and the
    trapezoid y_t + (sigma_ve_s - sigma_ve_t) (d_t + d_e)/2, multiplied by alpha_s, is exactly
    x_s = x_e + alpha_s (e^h - 1)/2 (D_e - D_t), D_e the x0 prediction at (x_e, s). The last interval
    (to t = 0) is the Euler step alone, whose result is D_t: Algorithm 1's sigma_{N} = 0 case.

    The first interval is an Euler step too where the schedule reaches gamma = 0 at t = 1 (cosine,
    cosine-variant): sigma_ve(1) is infinite there, held at 3.2e4 only by the 1e-9 clip, and the
    trapezoid gives the end slope half the weight over the whole [sigma_ve_s, 3.2e4]: its correction
    alpha_s (e^h - 1)/2 (D_e - D_t) grows without bound with the clip (x 36 at 10 steps of
    cosine-variant), while Euler's step from t = 1 does not depend on it. Algorithm 1 assumes a
    finite sigma_max (80 in EDM); the linear schedule has one (157) and gets the full algorithm.
    So NFE = 2 steps - 1 with a finite sigma_max, 2 steps - 2 for the cosine schedules.
    """
    _takes_no_eta("heun", eta)
    _check(steps, generators)
    gammas, logsnrs = _time_grid(schedule, steps)
    infinite_start = gammas[steps] <= GAMMA_MIN  # sigma_ve(1) is the clip's, not the schedule's
    x = _per_sample_noise(shape, generators, device)  # (B, *shape) = x at t = 1
    with torch.no_grad():
        for i in range(steps, 0, -1):
            g_t, g_s = gammas[i], gammas[i - 1]
            d, _ = _predict(model, x, logsnrs[i], g_t, clip_x0)
            if i == 1:
                x = d
            else:
                h = 0.5 * (logsnrs[i - 1] - logsnrs[i])  # lambda_s - lambda_t = log(sigma_ve_t / sigma_ve_s)
                x = ((1.0 - g_s) / (1.0 - g_t)) ** 0.5 * x - (g_s**0.5 * math.expm1(-h)) * d  # Euler
                if not (i == steps and infinite_start):
                    d_e, _ = _predict(model, x, logsnrs[i - 1], g_s, clip_x0)
                    x = x + (0.5 * g_s**0.5 * math.expm1(h)) * (d_e - d)  # the trapezoid
            if progress is not None:
                progress(steps - i + 1, steps)
    return x


def count_nfe(sampler: str, schedule: Schedule, steps: int) -> int:
    """UNet evaluations per sample of a SAMPLERS entry: counted on a zero model and one 1-value code (free)."""
    calls = [0]

    def zero_eps(x: Tensor, logsnr: Tensor) -> Tensor:
        calls[0] += 1
        return torch.zeros_like(x)

    SAMPLERS.get(sampler)(zero_eps, schedule, (1, 1, 1), steps=steps, generators=sample_generators(0, [0]))
    return calls[0]
