"""The diffusion training objective on key codes (paper Sec. 4, Suppl. A.6; Ho et al. 2020 Eq. 14).

Key codes z in [0, 1] (the frozen encoder's output, without relaxed-precision noise) are mapped to
x0 = 2z - 1 on [-1, 1], the range diffusion models are set up for; no data-dependent rescaling is
needed because the codes are strictly bounded (Sec. 3.4, "strictly bounded code variance").

    t ~ U(0, 1) per sample,  eps ~ N(0, I),  x_t = alpha(t) x0 + sigma(t) eps
    loss = mean_b  w(t_b) * mean_{c,h,w} (eps_theta(x_t, logSNR(t))_b - eps_b)^2

with w = 1, or min(SNR, gamma)/SNR under min-SNR-gamma weighting (config (a)).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from brics_cli.diffusion.schedules import Schedule

EpsModel = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, C, H, W), logsnr (B,)) -> eps (B, C, H, W)


def codes_to_x0(z: Tensor) -> Tensor:
    """Key codes in [0, 1] -> diffusion data x0 = 2z - 1 in [-1, 1]."""
    return z * 2.0 - 1.0


def x0_to_codes(x0: Tensor) -> Tensor:
    """Sampled x0 -> key codes (x0 + 1)/2, clamped to [0, 1]: the grids are only defined there."""
    return ((x0 + 1.0) * 0.5).clamp(0.0, 1.0)


def diffusion_loss(
    model: EpsModel, schedule: Schedule, x0: Tensor, generator: torch.Generator | None = None,
    t: Tensor | None = None, eps: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted epsilon MSE for a batch x0 (B, C, H, W) on [-1, 1].

    Returns (loss, terms); terms holds detached scalars: `mse` (unweighted epsilon MSE), `weight`
    (mean loss weight) and `loss`. With `generator`, t and eps are drawn from it (on its device) and
    moved to x0's device, so a test can repeat a step exactly; `t` (B,) and `eps` (like x0) may also
    be given, e.g. drawn once for a batch that is then split into micro-batches.
    """
    B = x0.shape[0]
    device = generator.device if generator is not None else x0.device
    if t is None:
        t = torch.rand(B, generator=generator, device=device).to(x0.device)  # [B]
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=device).to(x0.device, x0.dtype)
    shape = (B,) + (1,) * (x0.dim() - 1)
    x_t = schedule.alpha(t).view(shape) * x0 + schedule.sigma(t).view(shape) * eps
    per_sample = (model(x_t, schedule.logsnr(t)).float() - eps.float()).square().flatten(1).mean(1)  # [B]
    weight = schedule.loss_weight(t)  # [B], computed before any broadcasting
    loss = (weight * per_sample).mean()
    terms = {"loss": loss.detach(), "mse": per_sample.mean().detach(), "weight": weight.mean().detach()}
    return loss, terms
