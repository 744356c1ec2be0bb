"""DINOv2 ViT-L/14 features for FD-DINOv2, as EDM2 (Karras et al. 2024) and dgm-eval (Stein et al. 2023) use them.

The network is DINOv2's `DinoVisionTransformer` (Oquab et al. 2023) at the `dinov2_vitl14` hub entry's
configuration, written out here so that it loads offline from its standard weight file
`dinov2_vitl14_pretrain.pth` with the file's own key names (`torch.hub.load` would need the hub repo's
code on the machine, and torch-fidelity 0.4's DINOv2 extractor loads only through it):

- patch 14, width 1024, depth 24, 16 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, exact GELU,
  LayerScale (`ls1.gamma`, `ls2.gamma`), one class token, no register tokens;
- a learned position embedding for 37 x 37 + 1 positions (trained at 518 px), interpolated bicubically
  to the input's patch grid with DINOv2's `interpolate_offset` 0.1 (scale factor (16 + 0.1) / 37 at 224).

Images reach it as in EDM2's `DINOv2Detector` (resize_mode "torch"): uint8 RGB -> float, bicubic resize with
antialiasing to 224 x 224 (the aspect ratio is not kept; images already 224 x 224 are not resized) ->
/255 -> ImageNet mean/std. dgm-eval resizes with PIL bicubic instead, which EDM2 reports gives "almost the
same results". The feature is the model's output: the class token after the final LayerNorm
(`x_norm_clstoken`), 1024-d, in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from brics_cli.errors import BricsError

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_L14 = dict(patch=14, dim=1024, depth=24, heads=16, trained_grid=37)  # dinov2_vitl14: img_size 518 = 37 * 14
INTERPOLATE_OFFSET = 0.1  # DINOv2's historical kludge, kept by its hub models (backward compatibility)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d_h)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_h)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoViT(nn.Module):
    """DINOv2's ViT with its parameter names (`cls_token`, `pos_embed`, `mask_token`, `patch_embed.proj`,
    `blocks.N.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}`, `norm`), so its checkpoint loads strictly."""

    def __init__(self, patch: int, dim: int, depth: int, heads: int, trained_grid: int):
        super().__init__()
        self.patch = patch
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, trained_grid**2 + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # used in DINOv2's training only; in the file
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h*w/patch^2, D): the class position, then the 37 x 37 grid resized bicubically to this patch grid."""
        n = self.pos_embed.shape[1] - 1
        side = int(math.sqrt(n))
        h0, w0 = h // self.patch, w // self.patch
        if h0 * w0 == n and h0 == w0:
            return self.pos_embed
        grid = self.pos_embed[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, 37, 37)
        # DINOv2 passes a scale factor, not a size: (h0 + 0.1) / 37 rounds down to h0 rows.
        scale = ((h0 + INTERPOLATE_OFFSET) / side, (w0 + INTERPOLATE_OFFSET) / side)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        assert grid.shape[-2:] == (h0, w0), grid.shape
        grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat([self.pos_embed[:, :1], grid.to(self.pos_embed.dtype)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D): the class token after the final LayerNorm."""
        b, _, h, w = x.shape
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(x)], 1)  # (B, 1 + N, D)
        tokens = tokens + self.position_embedding(h, w)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


def edm2_preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, 224, 224) as EDM2's DINOv2Detector: bicubic + antialias resize, /255, ImageNet mean/std."""
    x = images.to(torch.float32)
    if x.shape[2] != INPUT_SIZE or x.shape[3] != INPUT_SIZE:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
    x = x / 255
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
    return (x - mean) / std


def load_dinov2_vitl14(path, device: torch.device) -> DinoViT:
    """ViT-L/14 with the weights of `path` (a `dinov2_vitl14_pretrain.pth` state dict), in eval mode, no gradients."""
    with torch.device("meta"):  # shapes only: the file's tensors are assigned below
        model = DinoViT(**VIT_L14)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise BricsError(
            f"{path} is not a DINOv2 ViT-L/14 state dict (dinov2_vitl14_pretrain.pth, without registers): "
            f"{len(missing)} keys missing, {len(unexpected)} unexpected, {len(wrong)} of another shape (first: {first})"
        )
    model.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in state.items()}, assign=True)
    return model.to(device).eval().requires_grad_(False)


def dinov2_network(paths, device: torch.device):
    """The `Extractor.build` of "dinov2": uint8 batches -> {"dinov2": (B, 1024) float32}."""
    model = load_dinov2_vitl14(paths["dinov2-vit-l-14"], device)
    return lambda x: {"dinov2": model(edm2_preprocess(x)).float()}
