"""StyleGAN2 building blocks for the BRICS decoder and discriminator (paper Sec. 3.3).

Karras et al., "Analyzing and Improving the Image Quality of StyleGAN" (StyleGAN2, CVPR 2020),
Sec. 2.2 (weight demodulation) and Appendix B; the authors of BRICS build their decoder and
discriminator from the StyleGAN2/3 code base (REFERENCES Sec. 3 and 8). Written afresh in pure
PyTorch (no custom CUDA ops), so it runs unchanged on CPU and GPU:

    EqualLinear, EqualConv2d   equalised learning rate (Karras et al. 2018, ProGAN Sec. 4.1)
    blur                       separable [1,3,3,1] FIR filter (StyleGAN2's upfirdn2d, here elementwise)
    ModulatedConv2d            modulation + demodulation, optionally 2x up-sampling
    DownConv2d                 blur then stride-2 conv (the discriminator's down-sampling conv)
    NoiseInjection             per-pixel noise with a learned strength
    ToRGB                      1x1 modulated conv (no demodulation) + upsampled RGB skip
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # keeps the activation's second moment ~1 for unit-variance input (He init)

# 1-D FIR filter of StyleGAN2; its outer product is the 4x4 [1,3,3,1] blur / up-sampling filter.
FIR_TAPS = (1.0, 3.0, 3.0, 1.0)


def lrelu_gain(x: Tensor) -> Tensor:
    """StyleGAN's "fused" activation: leaky ReLU 0.2 times sqrt(2)."""
    return F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: w stored N(0,1)/lr_mul, used as w * lr_mul/sqrt(fan_in).

    Storing the unit-variance weight and scaling at run time makes Adam's per-parameter step the
    same relative size for every layer; lr_mul < 1 slows one layer down (the mapping MLP uses 0.01).
    The bias is stored as bias_init/lr_mul, so its effective initial value is bias_init.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: Literal["lrelu"] | None = None,
    ) -> None:
        super().__init__()
        if activation not in (None, "lrelu"):
            raise ValueError(f"activation must be None or 'lrelu', got {activation!r}")
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), bias_init / lr_mul)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias * self.lr_mul if self.bias is not None else None
        x = F.linear(x, self.weight * self.weight_gain, b)  # (..., out)
        return lrelu_gain(x) if self.activation == "lrelu" else x

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"{in_f}, {out_f}, bias={self.bias is not None}, lr_mul={self.lr_mul}, activation={self.activation}"


class EqualConv2d(nn.Module):
    """Conv2d with equalised learning rate (weight stored N(0,1), scaled by 1/sqrt(in * k * k))."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.weight_gain, self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        out_ch, in_ch, k, _ = self.weight.shape
        return (
            f"{in_ch}, {out_ch}, kernel={k}, stride={self.stride}, padding={self.padding}, "
            f"bias={self.bias is not None}"
        )


def blur(x: Tensor, pad: tuple[int, int], gain: float = 1.0) -> Tensor:
    """Separable [1,3,3,1] FIR filter: pad H and W by pad[0] before and pad[1] after, then filter.

    (B, C, H, W) -> (B, C, H + p0 + p1 - 3, W + p0 + p1 - 3). The 1-D taps are normalised to sum
    to sqrt(gain), so the 2-D filter sums to `gain` (4 after a 2x zero-insertion up-sampling).

    Written as a weighted sum of four shifted slices per axis rather than a depthwise F.conv2d, on
    purpose: brics counts multiply-accumulates with torch.utils.flop_counter, which counts conv and
    matmul ops but not elementwise ones, and the authors' ~67.7 GMAC decoder count likewise left out
    their upfirdn2d custom op. A depthwise conv here would add ~0.2 GMAC to the 256x256 decoder.
    The zero padding is never materialised (each tap adds over the output rows it reaches) and the
    sums accumulate in place into one buffer per axis (autograd-safe: scalar multiplies and adds
    save no inputs), several times faster on CPU than padding and summing temporaries
    (benchmarks/RESULTS.md, Decoders). Keeps the input's memory format (channels-last stays so).
    """
    taps = [t / sum(FIR_TAPS) * math.sqrt(gain) for t in FIR_TAPS]
    return _fir_axis(_fir_axis(x, 2, pad, taps), 3, pad, taps)


def _fir_axis(x: Tensor, dim: int, pad: tuple[int, int], taps: list[float]) -> Tensor:
    """out[i] = sum_k taps[k] * x[i + k - pad[0]] along `dim`, x taken as 0 outside its range."""
    # The filter is symmetric, so correlation and convolution agree.
    p0, p1 = pad
    n_in = x.shape[dim]
    n_out = n_in + p0 + p1 - len(taps) + 1
    if n_out <= 0:
        raise ValueError(f"blur: {n_in} samples with padding {pad} leave no output along dim {dim}")
    # Tap k reaches the output rows [lo, hi): those whose input row i + k - p0 lies inside x.
    spans = [(max(0, p0 - k), min(n_out, n_in + p0 - k)) for k in range(len(taps))]
    full = [k for k, (lo, hi) in enumerate(spans) if (lo, hi) == (0, n_out)]
    if full:  # one tap covers every output row: it initialises the buffer
        first = full[0]
        out = x.narrow(dim, first - p0, n_out) * taps[first]
    else:
        first = -1
        shape = list(x.shape)
        shape[dim] = n_out
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x)).zero_()
    for k, (lo, hi) in enumerate(spans):
        if k != first and hi > lo:
            out.narrow(dim, lo, hi - lo).add_(x.narrow(dim, lo + k - p0, hi - lo), alpha=taps[k])
    return out


def _memory_format(x: Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution (Karras et al. 2020, Sec. 2.2, Eq. 1-3), no bias.

    s = affine(w) scales the weight per input channel (w'_ijk = s_i w_ijk); with demodulation each
    output channel's weight is divided by sqrt(sum_{i,k} w'_ijk^2 + 1e-8), so a unit-variance input
    gives a unit-variance output. Each sample has its own weights, run as one grouped conv over
    the batch (groups = B). With upsample=True the conv is a stride-2 transposed conv followed by
    the [1,3,3,1] blur (StyleGAN2's up-conv): output exactly (2H, 2W).
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, style_dim: int, demodulate: bool = True, upsample: bool = False
    ) -> None:
        super().__init__()
        if upsample and kernel != 3:
            raise ValueError(f"upsampling ModulatedConv2d supports kernel 3 only, got {kernel}")
        self.in_ch, self.out_ch, self.kernel = in_ch, out_ch, kernel
        self.demodulate, self.upsample = demodulate, upsample
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel, kernel))
        self.weight_gain = 1.0 / math.sqrt(in_ch * kernel * kernel)
        # bias_init 1: the initial styles are ~1, so training starts from the plain (unmodulated) conv.
        self.affine = EqualLinear(style_dim, in_ch, bias_init=1.0)

    def modulated_weight(self, w: Tensor) -> Tensor:
        """(B, style_dim) -> per-sample weights (B, out, in, k, k)."""
        s = self.affine(w)  # (B, in)
        weight = self.weight * self.weight_gain * s[:, None, :, None, None]  # (B, out, in, k, k)
        if self.demodulate:
            d = torch.rsqrt(weight.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8)  # (B, out, 1, 1, 1)
            weight = weight * d
        return weight

    def forward(self, x: Tensor, w: Tensor, fused: bool | None = None) -> Tensor:
        """fused: one grouped conv with per-sample weights; otherwise scale the activations, run one
        shared-weight conv and scale the outputs (equal maths, StyleGAN2-ADA's `fused_modconv=False`),
        which is faster whenever gradients are needed. None: fused only without autograd."""
        if fused is None:
            fused = not torch.is_grad_enabled()
        if not fused:
            return self._forward_unfused(x, w)
        B, C, H, W = x.shape  # (B, in, H, W); w: (B, style_dim)
        weight = self.modulated_weight(w)  # (B, out, in, k, k)
        x = x.reshape(1, B * C, H, W)  # fold the batch into channels: one grouped conv for all samples
        if self.upsample:
            # conv_transpose2d wants (in, out/groups, k, k) per group: (B*in, out, k, k).
            weight = weight.transpose(1, 2).reshape(B * C, self.out_ch, self.kernel, self.kernel)
            # Zero-insertion 2x up-sampling fused with the 3x3 conv: (1, B*out, 2H+1, 2W+1). Its
            # MACs are counted at input resolution, as in StyleGAN2 (and the paper's decoder count).
            x = F.conv_transpose2d(x, weight, stride=2, padding=0, groups=B)
            # The FIR low-pass removes the zero-insertion aliasing and trims to (2H, 2W); gain 4
            # restores the mean lost to the 3 inserted zeros per 2x2 block.
            x = blur(x, pad=(1, 1), gain=4.0)  # (1, B*out, 2H, 2W)
        else:
            weight = weight.reshape(B * self.out_ch, C, self.kernel, self.kernel)  # (B*out, in, k, k)
            x = F.conv2d(x, weight, padding=self.kernel // 2, groups=B)  # (1, B*out, H, W)
        return x.reshape(B, self.out_ch, x.shape[2], x.shape[3])  # (B, out, H', W')

    def _forward_unfused(self, x: Tensor, w: Tensor) -> Tensor:
        s = self.affine(w)  # (B, in)
        x = self.conv_shared(x * s[:, :, None, None])
        if self.demodulate:
            x = x * self.demodulation(s)[:, :, None, None]
        return x

    def demodulation(self, s: Tensor) -> Tensor:
        """Styles s (B, in) -> the demodulation factors d (B, out), computed without per-sample weights."""
        weight = self.weight[0] * self.weight_gain  # (out, in, k, k)
        # sum_{i,k} (s_i w_oik)^2 = (s^2) @ (sum_k w_oik^2)^T
        return torch.rsqrt(s.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8)  # (B, out)

    def conv_shared(self, x: Tensor) -> Tensor:
        """The shared-weight (unmodulated) conv, up-conv included, on already-modulated input."""
        weight = self.weight[0] * self.weight_gain  # (out, in, k, k)
        if x.is_contiguous(memory_format=torch.channels_last):
            weight = weight.contiguous(memory_format=torch.channels_last)
        if self.upsample:
            return blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2, padding=0), pad=(1, 1), gain=4.0)
        return F.conv2d(x, weight, padding=self.kernel // 2)

    def extra_repr(self) -> str:
        return (
            f"{self.in_ch}, {self.out_ch}, kernel={self.kernel}, demodulate={self.demodulate}, "
            f"upsample={self.upsample}"
        )


def downsample_pad(kernel: int) -> tuple[int, int]:
    """Blur padding so that blur + `kernel`x`kernel` stride-2 conv (padding 0) maps H -> H/2."""
    # The 4-tap blur shrinks by 3, a k-tap stride-2 conv gives floor((n - k) / 2) + 1: we need
    # n = H + p - 3 with n - k = H - 2, i.e. p = (4 - 2) + (k - 1), split as evenly as possible.
    p = (len(FIR_TAPS) - 2) + (kernel - 1)
    return (p + 1) // 2, p // 2


class DownConv2d(nn.Module):
    """Discriminator down-sampling conv: [1,3,3,1] blur, then a stride-2 EqualConv2d (H -> H/2).

    Blurring before the stride-2 conv is StyleGAN2's anti-aliased down-sampling; the blur is
    elementwise like the up-sampling one, so MAC counts see only the conv.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, bias: bool = True) -> None:
        super().__init__()
        self.pad = downsample_pad(kernel)
        self.conv = EqualConv2d(in_ch, out_ch, kernel, stride=2, padding=0, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(blur(x, pad=self.pad))  # (B, in, H, W) -> (B, out, H/2, W/2)


class NoiseInjection(nn.Module):
    """Adds strength * N(0, 1) per pixel, one noise channel broadcast over all feature channels.

    The strength starts at 0 (StyleGAN2). Noise is added only in training mode: in eval mode
    this layer is the identity, so reconstructions and samples are deterministic -- the
    decoder is used as a deterministic function of the retrieved features downstream (metrics,
    diffusion decoding). StyleGAN2's own eval default is a fixed ("const") noise map instead; here
    eval sees the noise-free activations, a small train/eval gap accepted for determinism.
    """

    def __init__(self) -> None:
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        B, _, H, W = x.shape
        noise = torch.randn(B, 1, H, W, device=x.device, dtype=x.dtype)  # (B, 1, H, W)
        return x + self.strength * noise


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation (+ bias) to `out_ch` channels, plus the RGB skip.

    The previous (half-resolution) RGB is up-sampled 2x with bilinear interpolation
    (align_corners=False), whose weights (1/4, 3/4) are exactly StyleGAN2's [1,3,3,1] FIR
    up-sampling filter in the interior; at the image border bilinear repeats the edge pixel where
    upfirdn2d pads with zeros, which avoids a darkened 1-pixel frame.
    """

    def __init__(self, in_ch: int, style_dim: int, out_ch: int = 3) -> None:
        super().__init__()
        # No demodulation: the output is an image, whose scale must follow the style freely.
        self.conv = ModulatedConv2d(in_ch, out_ch, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, out_ch, 1, 1))

    def forward(self, x: Tensor, w: Tensor, skip: Tensor | None = None) -> Tensor:
        return self._add_skip(self.conv(x, w) + self.bias, skip)  # (B, out_ch, H, W)

    def forward_scaled(self, x: Tensor, scale: Tensor, w: Tensor, skip: Tensor | None = None) -> Tensor:
        """forward(x * scale[:, :, None, None], w, skip) without forming the product (inference form).

        The scale folds into the per-sample 1x1 weights, applied as one batched matmul over the
        pixels (a view, no copy, when x is channels-last).
        """
        B, C, H, W = x.shape  # scale: (B, C)
        s = self.conv.affine(w) * scale  # (B, C)
        weight = self.conv.weight[0, :, :, 0, 0] * self.conv.weight_gain  # (out, C)
        pixels = x.permute(0, 2, 3, 1).reshape(B, H * W, C)
        rgb = torch.baddbmm(self.bias.view(1, 1, -1), pixels, s[:, :, None] * weight.t())  # (B, H*W, out)
        return self._add_skip(rgb.view(B, H, W, -1).permute(0, 3, 1, 2), skip)  # (B, out, H, W)

    @staticmethod
    def _add_skip(rgb: Tensor, skip: Tensor | None) -> Tensor:
        if skip is None:
            return rgb
        return rgb + F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)  # (B, out_ch, H, W)
