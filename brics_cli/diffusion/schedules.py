"""Noise schedules on continuous time t in [0, 1] (paper Sec. 4, Suppl. A.6 and Fig. 14).

A schedule is gamma(t) = alpha_bar(t), the signal variance of the forward process

    x_t = alpha(t) x0 + sigma(t) eps,    alpha = sqrt(gamma),  sigma = sqrt(1 - gamma),
    logSNR(t) = log(gamma / (1 - gamma)),

falling from gamma(0) ~ 1 (clean data) to gamma(1) ~ 0 (pure noise). Registered schedules:

    cosine          Nichol & Dhariwal 2021: gamma = f(t) / f(0), f(t) = cos^2((t + s)/(1 + s) pi/2),
                    s = 0.008 -- Table 4's config (a), with `min_snr_gamma: 5` (Hang et al. 2023)
    cosine-variant  Chen 2023, Algorithm 1: start 0.2, end 1, tau 1.5 -- config (b), the default
    linear          DDPM (Ho et al. 2020): betas linear 1e-4 .. 0.02 over 1000 steps
    linear-alpha    gamma = 1 - t (Chen 2023; the paper's Suppl. D.2 and Fig. 14): logSNR = log((1 - t) / t)

Endpoints: every gamma is clipped to [GAMMA_MIN, GAMMA_MAX] = [1e-9, 1 - 1e-9]. Without the
lower clip gamma(1) = 0 (cosine, cosine-variant, linear-alpha) and logSNR(1) = -inf, which the UNet's noise-level
embedding cannot take; Chen 2023 clips at 1e-9, and 1e-9 is also about where the discrete cosine
schedule ends (its last beta is clipped at 0.999). The upper clip keeps logSNR(0) finite for a
t ~ U(0, 1) draw of exactly 0. Both clips give |logSNR| <= LOGSNR_MAX = 20.7. Samplers never
evaluate the model at t = 0: their last step returns the predicted x0 itself.

Every gamma is computed in float64 (on [B]-shaped tensors: one t per sample) and alpha, sigma,
logSNR and the loss weights come back in the dtype of t: in float32, 1 - gamma near t = 0 would
lose most of its digits (sigma(1e-3) of the cosine schedule is ~2e-3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from brics_cli.registry import SCHEDULES

GAMMA_MIN = 1e-9
GAMMA_MAX = 1.0 - 1e-9
LOGSNR_MAX = math.log(GAMMA_MAX / (1.0 - GAMMA_MAX))  # 20.72; logSNR lies in [-LOGSNR_MAX, LOGSNR_MAX]


def _check_min_snr(value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"min_snr_gamma must be > 0 or null (off), got {value}")


class Schedule:
    """gamma(t) = alpha_bar(t) at continuous t in [0, 1], and what follows from it.

    Subclasses implement `_gamma(t)` on float64 tensors; the clipping and everything else is here.
    """

    Config: type
    cfg: Any

    def _gamma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _gamma64(self, t: Tensor) -> Tensor:
        return self._gamma(t.to(torch.float64)).clamp(GAMMA_MIN, GAMMA_MAX)

    def gamma(self, t: Tensor) -> Tensor:
        """alpha_bar(t), the signal variance, in [1e-9, 1 - 1e-9]; shape of t ([B])."""
        return self._gamma64(t).to(t.dtype)

    def alpha(self, t: Tensor) -> Tensor:
        return self._gamma64(t).sqrt().to(t.dtype)

    def sigma(self, t: Tensor) -> Tensor:
        return (1.0 - self._gamma64(t)).sqrt().to(t.dtype)

    def logsnr(self, t: Tensor) -> Tensor:
        g = self._gamma64(t)
        return (g.log() - torch.log1p(-g)).to(t.dtype)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight of the epsilon MSE, shape [B] like t.

        min-SNR-gamma (Hang et al. 2023, Eq. 10 for epsilon prediction): min(SNR, gamma) / SNR,
        which down-weights the low-noise samples whose SNR exceeds gamma. 1 when off.
        """
        min_snr_gamma = getattr(self.cfg, "min_snr_gamma", None)
        if min_snr_gamma is None:
            return torch.ones_like(t)
        g = self._gamma64(t)
        snr = g / (1.0 - g)  # [B], before any broadcasting against (B, C, H, W)
        return (snr.clamp(max=min_snr_gamma) / snr).to(t.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg})"


@dataclass
class CosineScheduleConfig:
    name: str = "cosine"
    s: float = 0.008  # offset that keeps beta small near t = 0 (Nichol & Dhariwal Sec. 3.2)
    min_snr_gamma: float | None = None  # 5 = Table 4's config (a); null = plain epsilon MSE

    def validate(self) -> None:
        if not self.s >= 0:
            raise ValueError(f"schedule s must be >= 0, got {self.s}")
        _check_min_snr(self.min_snr_gamma)


@SCHEDULES.register("cosine")
class CosineSchedule(Schedule):
    """Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t + s)/(1 + s) * pi/2).

    The discrete schedule of their paper (and diffusers' `squaredcos_cap_v2`) takes alpha_bar at
    t_k = (k + 1)/T after step k = 0..T-1 and clips each beta at 0.999, which changes only the last
    step (alpha_bar ~ 2e-9 there); here the continuous gamma is clipped at 1e-9 instead.
    """

    Config = CosineScheduleConfig

    def __init__(self, cfg: CosineScheduleConfig | None = None) -> None:
        self.cfg = cfg or CosineScheduleConfig()

    def _gamma(self, t: Tensor) -> Tensor:
        s = self.cfg.s
        f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
        return torch.cos((t + s) / (1 + s) * (math.pi / 2)).square() / f0


@dataclass
class CosineVariantScheduleConfig:
    name: str = "cosine-variant"
    start: float = 0.2  # Suppl. A.6
    end: float = 1.0
    tau: float = 1.5
    min_snr_gamma: float | None = None

    def validate(self) -> None:
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(f"schedule needs 0 <= start < end <= 1, got start {self.start}, end {self.end}")
        if not self.tau > 0:
            raise ValueError(f"schedule tau must be > 0, got {self.tau}")
        _check_min_snr(self.min_snr_gamma)


@SCHEDULES.register("cosine-variant")
class CosineVariantSchedule(Schedule):
    """Chen 2023, "On the importance of noise scheduling for diffusion models", Algorithm 1 (cosine):

        v(u) = cos(u * pi/2)^(2 tau),  gamma(t) = (v(end) - v(t (end - start) + start)) / (v(end) - v(start)),

    clipped at 1e-9. With start 0.2, tau 1.5 (the paper's config (b)) it spends more of t at low SNR
    than the plain cosine (Fig. 14).
    """

    Config = CosineVariantScheduleConfig

    def __init__(self, cfg: CosineVariantScheduleConfig | None = None) -> None:
        self.cfg = cfg or CosineVariantScheduleConfig()

    def _gamma(self, t: Tensor) -> Tensor:
        c = self.cfg

        def v(u: Tensor | float) -> Tensor:
            return torch.cos(torch.as_tensor(u, dtype=torch.float64) * (math.pi / 2)).pow(2 * c.tau)

        v_start, v_end = v(c.start), v(c.end)
        return (v_end - v(t * (c.end - c.start) + c.start)) / (v_end - v_start)


@dataclass
class LinearScheduleConfig:
    name: str = "linear"
    beta_start: float = 1e-4  # Ho et al. 2020, Sec. 4
    beta_end: float = 0.02
    num_steps: int = 1000
    min_snr_gamma: float | None = None

    def validate(self) -> None:
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"schedule needs 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.num_steps < 1:
            raise ValueError(f"schedule num_steps must be >= 1, got {self.num_steps}")
        _check_min_snr(self.min_snr_gamma)


@SCHEDULES.register("linear")
class LinearSchedule(Schedule):
    """DDPM's linear betas, expressed in continuous t.

    Discrete: alpha_bar_k = prod_{i <= k} (1 - beta_i), k = 0..T-1, reached at t = (k + 1)/T. In
    between, log alpha_bar is interpolated linearly in t (from log 1 = 0 at t = 0), so gamma matches
    DDPM's alpha_bar exactly on the grid and is continuous and decreasing everywhere. (The VP-SDE
    limit exp(-(b0 t + (b1 - b0) t^2 / 2)) is not used: it replaces log(1 - beta) by -beta and is
    off by up to 13% at t = 1.)
    """

    Config = LinearScheduleConfig

    def __init__(self, cfg: LinearScheduleConfig | None = None) -> None:
        self.cfg = cfg or LinearScheduleConfig()
        c = self.cfg
        betas = torch.linspace(c.beta_start, c.beta_end, c.num_steps, dtype=torch.float64)
        # log alpha_bar at t = k / T, k = 0..T (the first is log 1 = 0).
        self.log_alpha_bar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log1p(-betas).cumsum(0)])

    def _gamma(self, t: Tensor) -> Tensor:
        T = self.cfg.num_steps
        table = self.log_alpha_bar.to(t.device)
        x = t.clamp(0, 1) * T
        k = x.floor().clamp(max=T - 1)
        frac = x - k
        k = k.long()
        return torch.exp(table[k] * (1 - frac) + table[k + 1] * frac)


@dataclass
class LinearAlphaScheduleConfig:
    name: str = "linear-alpha"
    min_snr_gamma: float | None = None

    def validate(self) -> None:
        _check_min_snr(self.min_snr_gamma)


@SCHEDULES.register("linear-alpha")
class LinearAlphaSchedule(Schedule):
    """alpha_bar(t) = gamma(t) = 1 - t (Chen 2023, "On the importance of noise scheduling", Sec. 2;
    the paper's Suppl. D.2): q(x_t | x0) = N(sqrt(1 - t) x0, t I), logSNR(t) = log((1 - t) / t).

    It spends far less of t at low SNR than the cosine schedules (Fig. 14): logSNR < -2.5 on 7.6% of
    t against 18% (cosine) and 33% (cosine-variant), the phase that lays out the coarse shape (Fig. 13). The paper found no spot artifacts with it, but a
    worse 5k FID (9.33 relaxed precision, 9.80 KL) from lower diversity. gamma(1) = 0 is clipped to
    1e-9 like the cosine schedules' (logSNR(1) = -20.7), gamma(0) = 1 to 1 - 1e-9.
    """

    Config = LinearAlphaScheduleConfig

    def __init__(self, cfg: LinearAlphaScheduleConfig | None = None) -> None:
        self.cfg = cfg or LinearAlphaScheduleConfig()

    def _gamma(self, t: Tensor) -> Tensor:
        return 1.0 - t


def build_schedule(cfg: Any) -> Schedule:
    """The registered schedule named by `cfg.name`, built from its config."""
    return SCHEDULES.get(cfg.name)(cfg)
