"""Autoencoder losses (paper Eq. 5, Suppl. A.3-A.4; REFERENCES sections 3 and 8).

L_total = w_l2 * L2 + w_percep * L_percep + L_WGAN + w_gp * L_gp (+ w_kl * KL for the `kl`
bottleneck), with w_l2 = 20, w_percep = 5, w_gp = 4, w_kl = 1e-6 in the paper. The WGAN-GP terms
follow Gulrajani et al. 2017.

KL normalisation (`ae.loss.kl_normalise`). The paper takes w_kl = 1e-6 from LDM ("a typical weight
used in previous KL regularized latents [36]", Suppl. A.4). LDM's LPIPSWithDiscriminator sums both
terms per image and averages over the batch: rec = sum over the 3 H W pixel values, KL = sum over
the C_z H_z W_z code values, loss = rec + 1e-6 KL. brics keeps every other term a per-element mean
(so 20, 5 and 4 keep the paper's meaning) and divides that whole per-image objective by
N_x = 3 H W, which leaves the KL as KL_sum / N_x:

    image (default)  w_kl * KL_sum / N_x      LDM's balance: 1e-6 weighs the KL as the paper intends
    pixel            w_kl * KL_sum / N_z      both terms per-element means, N_z = C_z H_z W_z

`pixel` weighs the KL N_x / N_z times more than `image` (the compression ratio: 12 at 256 -> 64x64x4).
Before 2026-12-02 brics added w_kl * KL_sum to the mean L2, N_x = 196,608 times `image` at 256x256;
`ae.loss.kl=0.196608` reproduces that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor


@dataclass
class AELossConfig:
    l2: float = 20.0  # weight of the mean squared error
    perceptual: float = 5.0  # weight of the perceptual term
    perceptual_type: Literal["lpips-vgg", "vgg-l1", "none"] = "lpips-vgg"  # paper | authors' code | off
    gan: Literal["wgan-gp", "logistic-r1", "none"] = "wgan-gp"  # paper | authors' code | off
    gp: float = 4.0  # gradient-penalty weight (R1 gamma for logistic-r1)
    gan_start: int = 0  # step at which the adversarial terms switch on
    kl: float = 1e-6  # KL weight, used by the `kl` bottleneck only (Suppl. A.4)
    kl_normalise: Literal["image", "pixel"] = "image"  # LDM's per-image sums | per-element means (module doc)

    def validate(self) -> None:
        for name in ("l2", "perceptual", "gp", "kl"):
            if getattr(self, name) < 0:
                raise ValueError(f"ae.loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.gan_start < 0:
            raise ValueError(f"ae.loss.gan_start must be >= 0, got {self.gan_start}")
        if self.kl_normalise not in ("image", "pixel"):
            raise ValueError(f"ae.loss.kl_normalise must be 'image' or 'pixel', got {self.kl_normalise!r}")


def kl_loss(kl: Tensor, image_elements: int, code_elements: int, normalise: str) -> Tensor:
    """The KL term to weight by w_kl: kl (B,) is the KL summed over each image's code values.

    `image`: E_b[KL_b] / N_x (LDM's per-image sums, divided through by the N_x = 3 H W values over
    which the L2 is a mean); `pixel`: E_b[KL_b] / N_z, the mean over the N_z = C_z H_z W_z code values.
    """
    return kl.mean() / (image_elements if normalise == "image" else code_elements)


def wgan_generator_loss(fake_scores: Tensor) -> Tensor:
    """L_G = -E[D(fake)]."""
    return -fake_scores.mean()


def wgan_discriminator_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """L_D (without the penalty) = E[D(fake)] - E[D(real)]."""
    return fake_scores.mean() - real_scores.mean()


def gradient_penalty(discriminator: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor) -> Tensor:
    """E[(||grad_x D(x_hat)||_2 - 1)^2], x_hat = a real + (1 - a) fake, a ~ U(0,1) per sample."""
    a = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (a * real.detach() + (1 - a) * fake.detach()).requires_grad_(True)
    scores = discriminator(x_hat)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def logistic_generator_loss(fake_scores: Tensor) -> Tensor:
    """Non-saturating logistic loss (StyleGAN2, the authors' code): E[softplus(-D(fake))]."""
    return torch.nn.functional.softplus(-fake_scores).mean()


def logistic_discriminator_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """E[softplus(D(fake))] + E[softplus(-D(real))]."""
    return torch.nn.functional.softplus(fake_scores).mean() + torch.nn.functional.softplus(-real_scores).mean()


def r1_penalty(discriminator: Callable[[Tensor], Tensor], real: Tensor) -> Tensor:
    """E[||grad_x D(real)||^2] (Mescheder et al. 2018); the caller weights it by gamma / 2."""
    x = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(x).sum(), x, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()
