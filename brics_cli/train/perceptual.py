"""Perceptual losses of the autoencoder stage, with their pretrained backbones loaded offline.

- `lpips-vgg` (the paper, Sec. 3.3): LPIPS with the VGG16 backbone (lpips package).
- `vgg-l1` (the authors' code, REFERENCES section 8): mean L1 distance between VGG16 features at
  relu1_2, relu2_2, relu3_3 and relu4_3 of 224x224 bilinear resizes (ImageNet normalisation).

Both need torchvision's `vgg16-397923af.pth`. It is looked up locally (`brics weights status`);
if it is missing the command stops before training with the file name and where to put it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from brics_cli.train.losses import AELossConfig


class VGGL1(nn.Module):
    """The authors' perceptual loss: mean L1 distance of VGG16 activations, summed over layers."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features.requires_grad_(False).eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image loss (B,) for images in [-1, 1]."""
        loss = x.new_zeros(x.shape[0])
        for a, b in zip(self.features(x), self.features(y)):
            loss = loss + (a - b).abs().flatten(1).mean(1)
        return loss


class LPIPSLoss(nn.Module):
    def __init__(self, lpips_model: nn.Module) -> None:
        super().__init__()
        self.model = lpips_model.requires_grad_(False).eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.model(x, y).flatten(1).mean(1)


def build_perceptual(cfg: AELossConfig, device: torch.device) -> nn.Module | None:
    """The perceptual loss the recipe asks for, or None. Raises WeightsMissing before any work."""
    if cfg.perceptual_type == "none" or cfg.perceptual == 0:
        return None
    if cfg.perceptual_type == "lpips-vgg":
        from brics_cli.nets.perceptual import load_lpips

        return LPIPSLoss(load_lpips("vgg", device)).to(device)
    from brics_cli.nets.perceptual import vgg16_features

    return VGGL1(vgg16_features(("relu1_2", "relu2_2", "relu3_3", "relu4_3"), resize=224, device=device))
