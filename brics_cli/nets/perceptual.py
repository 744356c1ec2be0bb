"""LPIPS and VGG16 features with torchvision's ImageNet weights, read from local files.

The LPIPS backbones are torchvision's ImageNet weights; `lpips.LPIPS(pretrained=True)` would
download them, so `load_lpips` builds the network with `pnet_rand=True` (random backbone, nothing
downloaded) and then loads the backbone from the local file `weights.require` finds. LPIPS is the
`lpips` package (PerceptualSimilarity, v0.1 linear layers).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from brics_cli.nets.weights import LPIPS_WEIGHTS, WeightsMismatch, WeightsMissing, require, require_all

VGG16_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}  # index in vgg16.features
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_torchvision(arch: str, weight_name: str, device) -> nn.Module:
    import torchvision

    path = require(weight_name)
    with torch.device("meta"):  # no random init of weights that are replaced at once (seconds for VGG16)
        model = getattr(torchvision.models, arch)(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), assign=True)
    return model.to(device).eval().requires_grad_(False)


def load_lpips(net: str = "alex", device: str | torch.device = "cpu") -> nn.Module:
    """LPIPS with the `net` backbone loaded from the local torchvision file; raises WeightsMissing, never downloads."""
    import lpips

    if net not in LPIPS_WEIGHTS:
        raise ValueError(f"LPIPS net must be one of {', '.join(LPIPS_WEIGHTS)}, got {net!r}")
    backbone_name, _ = LPIPS_WEIGHTS[net]
    require_all(LPIPS_WEIGHTS[net])  # both files, in one message when both are missing
    backbone = _load_torchvision("alexnet" if net == "alex" else "vgg16", backbone_name, "cpu").features
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    # lpips splits torchvision's `features` into slices whose children keep their original index as name.
    for slice_ in (getattr(model.net, f"slice{i}") for i in range(1, 6)):
        for index, layer in slice_.named_children():
            layer.load_state_dict(backbone[int(index)].state_dict())
    return model.to(device).eval().requires_grad_(False)


def try_load_lpips(net: str = "alex", device: str | torch.device = "cpu") -> tuple[nn.Module | None, str | None]:
    """(model, None), or (None, reason) when a weight file is missing or wrong -- for `lpips_unavailable`."""
    try:
        return load_lpips(net, device), None
    except (WeightsMissing, WeightsMismatch) as exc:
        return None, str(exc)


class VGG16Features(nn.Module):
    """Frozen torchvision VGG16 activations at named ReLU layers, for perceptual losses.

    Input (B, 3, H, W) in [-1, 1]; it is mapped to [0, 1], normalised with the ImageNet mean/std and,
    if `resize` is set, bilinearly resized to resize x resize first (the authors' VGG-L1 loss uses 224).
    Output: a list of (B, C_l, H_l, W_l) activations in the order of `layers`.
    """

    def __init__(self, features: nn.Sequential, layers: Sequence[str], resize: int | None):
        super().__init__()
        unknown = [name for name in layers if name not in VGG16_LAYERS]
        if unknown:
            raise ValueError(f"unknown VGG16 layer(s) {unknown}; known: {', '.join(VGG16_LAYERS)}")
        self.indices = [VGG16_LAYERS[name] for name in layers]
        self.features = features[: max(self.indices) + 1]
        self.resize = resize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.resize is not None:
            x = nn.functional.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        h = ((x + 1) / 2 - self.mean) / self.std
        outputs = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.indices:
                outputs.append(h)
        return [outputs[sorted(self.indices).index(i)] for i in self.indices]


def vgg16_features(
    layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3"),
    resize: int | None = None,
    device: str | torch.device = "cpu",
) -> VGG16Features:
    """VGG16 feature extractor with the ImageNet weights from the local `vgg16-397923af.pth` (require("vgg16"))."""
    vgg = _load_torchvision("vgg16", "vgg16", "cpu")
    return VGG16Features(vgg.features, layers, resize).to(device).eval().requires_grad_(False)
