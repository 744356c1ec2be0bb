"""StyleGAN2 layers, decoder and discriminator against naive references written here (CPU, ~10 s)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from brics_cli.models.decoder import StyleGANDecoder, StyleGANDecoderConfig
from brics_cli.models.discriminator import Discriminator, DiscriminatorConfig, minibatch_stddev
from brics_cli.models.layers import EqualLinear, ModulatedConv2d, ToRGB, blur


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fir_kernel_2d(gain: float = 1.0) -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k2 = torch.outer(k, k)
    return k2 / k2.sum() * gain  # (4, 4)


def depthwise_fir(x: torch.Tensor, gain: float, padding: int) -> torch.Tensor:
    C = x.shape[1]
    weight = fir_kernel_2d(gain)[None, None].repeat(C, 1, 1, 1)  # (C, 1, 4, 4)
    return F.conv2d(x, weight, padding=padding, groups=C)


def reference_weights(conv: ModulatedConv2d, w: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample modulated (and demodulated) weights, one sample at a time."""
    out = []
    for b in range(w.shape[0]):
        s = conv.affine(w[b : b + 1])[0]  # (in,)
        weight = conv.weight[0] / math.sqrt(conv.in_ch * conv.kernel**2) * s[None, :, None, None]  # (out, in, k, k)
        if conv.demodulate:
            weight = weight / torch.sqrt(weight.pow(2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        out.append(weight)
    return out


@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_matches_per_sample_loop(demodulate: bool) -> None:
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, 3, style_dim=7, demodulate=demodulate)
    x, w = torch.randn(3, 6, 9, 9), torch.randn(3, 7)
    expected = torch.cat([F.conv2d(x[b : b + 1], wb, padding=1) for b, wb in enumerate(reference_weights(conv, w))])
    got = conv(x, w)
    assert got.shape == (3, 5, 9, 9)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_modulated_conv_upsample_matches_transpose_then_fir() -> None:
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, 3, style_dim=7, upsample=True)
    x, w = torch.randn(3, 6, 8, 8), torch.randn(3, 7)
    expected = []
    for b, wb in enumerate(reference_weights(conv, w)):
        y = F.conv_transpose2d(x[b : b + 1], wb.transpose(0, 1), stride=2)  # (1, 5, 17, 17)
        expected.append(depthwise_fir(y, gain=4.0, padding=1))  # (1, 5, 16, 16)
    got = conv(x, w)
    assert got.shape == (3, 5, 16, 16)
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad,gain", [((1, 1), 4.0), ((2, 2), 1.0), ((1, 2), 1.0), ((2, 1), 2.0), ((0, 0), 1.0), ((-1, 1), 1.0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_blur_matches_depthwise_conv(pad: tuple[int, int], gain: float, channels_last: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 10)
    padded = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))  # negative pads crop
    expected = depthwise_fir(padded, gain=gain, padding=0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = blur(x, pad=pad, gain=gain)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("pad", [(1, 1), (2, 2)])  # (2, 2): no tap covers every output row (zero-initialised buffer)
def test_blur_gradient_matches_depthwise_conv(pad: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    size = 9 + sum(pad) - 3
    g = torch.randn(2, 3, size, size)
    (grad,) = torch.autograd.grad((blur(x, pad=pad, gain=4.0) * g).sum(), x)
    padded = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    (expected,) = torch.autograd.grad((depthwise_fir(padded, gain=4.0, padding=0) * g).sum(), x)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)


def test_demodulation_gives_unit_variance_output() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 64, 32, 32)
    w = 5.0 * torch.randn(4, 16)  # large styles: without demodulation the scale would be far from 1
    demod = ModulatedConv2d(64, 8, 3, style_dim=16, demodulate=True)
    plain = ModulatedConv2d(64, 8, 3, style_dim=16, demodulate=False)
    plain.load_state_dict(demod.state_dict())
    with torch.no_grad():
        std_demod = demod(x, w)[:, :, 1:-1, 1:-1].std(dim=(2, 3))  # (B, out), interior pixels only
        std_plain = plain(x, w)[:, :, 1:-1, 1:-1].std(dim=(2, 3))
    assert ((std_demod > 0.85) & (std_demod < 1.15)).all(), std_demod
    assert (std_plain - 1).abs().max() > 0.5  # the check above is not vacuous


def test_equal_linear_runtime_scaling() -> None:
    torch.manual_seed(0)
    layer = EqualLinear(50, 4, bias_init=0.5, lr_mul=0.01, activation="lrelu")
    x = torch.randn(3, 50)
    # Stored N(0,1)/lr_mul, used as stored * lr_mul / sqrt(fan_in): effective weight std 1/sqrt(50).
    effective = layer.weight * 0.01 / math.sqrt(50)
    assert abs(effective.std().item() * math.sqrt(50) - 1) < 0.2
    expected = F.leaky_relu(x @ effective.T + 0.5, 0.2) * math.sqrt(2)
    torch.testing.assert_close(layer(x), expected)


def test_to_rgb_skip_is_fir_upsampling_inside_the_image() -> None:
    torch.manual_seed(0)
    to_rgb = ToRGB(8, style_dim=4)
    x, w, skip = torch.randn(2, 8, 12, 12), torch.randn(2, 4), torch.randn(2, 3, 6, 6)
    added = to_rgb(x, w, skip) - to_rgb(x, w)  # (2, 3, 12, 12)
    zeros = torch.zeros(2, 3, 12, 12)
    zeros[:, :, ::2, ::2] = skip  # zero insertion, then the [1,3,3,1] filter with gain 4
    fir = depthwise_fir(F.pad(zeros, (2, 1, 2, 1)), gain=4.0, padding=0)  # (2, 3, 12, 12)
    torch.testing.assert_close(added[:, :, 1:-1, 1:-1], fir[:, :, 1:-1, 1:-1], atol=1e-5, rtol=1e-5)


def test_to_rgb_forward_scaled_matches_forward_of_the_product() -> None:
    torch.manual_seed(0)
    to_rgb = ToRGB(8, style_dim=4)
    with torch.no_grad():
        to_rgb.bias.normal_()
    x, w, skip = torch.randn(2, 8, 12, 12), torch.randn(2, 4), torch.randn(2, 3, 6, 6)
    scale = torch.rand(2, 8) + 0.5
    expected = to_rgb(x * scale[:, :, None, None], w, skip)
    for x_in in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(to_rgb.forward_scaled(x_in, scale, w, skip), expected, atol=1e-5, rtol=1e-5)


def small_decoder(**overrides) -> StyleGANDecoder:
    cfg = StyleGANDecoderConfig(channel_base=256, **overrides)
    return StyleGANDecoder(cfg, in_channels=32, in_resolution=8, out_resolution=32)


def test_decoder_param_count_at_256() -> None:
    torch.manual_seed(0)
    dec = StyleGANDecoder(StyleGANDecoderConfig(), in_channels=512, in_resolution=64, out_resolution=256)
    synthesis, mapping = n_params(dec.blocks), n_params(dec.mapping)
    assert synthesis == 9_445_521  # the authors' released decoder (REFERENCES Sec. 8)
    assert mapping == 3 * (512 * 512 + 512)
    assert 9.0e6 <= n_params(dec) <= 10.5e6


def test_decoder_macs_at_256() -> None:
    torch.manual_seed(0)
    dec = StyleGANDecoder(StyleGANDecoderConfig(), in_channels=512, in_resolution=64, out_resolution=256).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        img = dec(torch.randn(1, 512, 64, 64))
    assert img.shape == (1, 3, 256, 256)
    macs = counter.get_total_flops() / 2
    assert 67.0e9 <= macs <= 68.0e9, macs


@pytest.mark.parametrize("batch", [1, 3])
def test_decoder_inference_path_matches_training_path(batch: int) -> None:
    """Eval without autograd takes _synthesize_inference: same function, same MACs, input untouched."""
    torch.manual_seed(0)
    dec = small_decoder().eval()
    with torch.no_grad():  # non-trivial biases and styles, so every folded term is exercised
        for name, p in dec.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    f = torch.randn(batch, 32, 8, 8)
    f_before = f.clone()
    with FlopCounterMode(display=False) as counter:
        expected = dec(f)  # grad enabled: the training path (eval: no noise)
    training_macs = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        got = dec(f)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    assert counter.get_total_flops() == training_macs
    torch.testing.assert_close(f, f_before, atol=0, rtol=0)  # the caller's features are not overwritten
    with torch.no_grad():  # channels-last features give the same image
        torch.testing.assert_close(dec(f.contiguous(memory_format=torch.channels_last)), got, atol=1e-5, rtol=1e-5)


def test_decoder_small_forward_backward_reaches_everything() -> None:
    torch.manual_seed(0)
    dec = small_decoder().train()
    f = torch.randn(2, 32, 8, 8, requires_grad=True)
    img = dec(f)
    assert img.shape == (2, 3, 32, 32)
    img.square().mean().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    # In training mode every parameter matters, the zero-initialised noise strengths included.
    missing = [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_decoder_eval_is_deterministic_and_train_is_noisy() -> None:
    torch.manual_seed(0)
    dec = small_decoder()
    f = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if name.endswith("noise.strength"):
                p.fill_(0.5)
        dec.eval()
        torch.testing.assert_close(dec(f), dec(f), atol=0, rtol=0)
        dec.train()
        assert (dec(f) - dec(f)).abs().max() > 1e-3
        assert small_decoder(noise=False).blocks[0].convs[0].noise is None


def test_decoder_rejects_bad_shapes_and_config() -> None:
    with pytest.raises(ValueError, match="out_resolution \\(48\\).*in_resolution \\(16\\)"):
        StyleGANDecoder(StyleGANDecoderConfig(), in_channels=8, in_resolution=16, out_resolution=48)
    with pytest.raises(ValueError, match="out_resolution \\(8\\).*in_resolution \\(16\\)"):
        StyleGANDecoder(StyleGANDecoderConfig(), in_channels=8, in_resolution=16, out_resolution=8)
    with pytest.raises(ValueError, match="channel_max"):
        StyleGANDecoderConfig(channel_max=0).validate()
    with pytest.raises(ValueError, match="expects features"):
        small_decoder()(torch.randn(1, 32, 16, 16))


def test_minibatch_stddev_matches_naive_groups() -> None:
    torch.manual_seed(0)
    for B, expected_group in [(6, 3), (4, 4), (5, 1), (1, 1)]:
        x = torch.randn(B, 8, 4, 4)
        out = minibatch_stddev(x, group=4, channels=2)  # (B, 10, 4, 4)
        assert out.shape == (B, 10, 4, 4)
        torch.testing.assert_close(out[:, :8], x)
        M = B // expected_group
        for b in range(B):
            members = x[b % M :: M]  # (G, 8, 4, 4): samples b', b' % M == b % M
            std = (members.var(dim=0, unbiased=False) + 1e-8).sqrt()  # (8, 4, 4)
            stat = std.reshape(2, 4, 4, 4).mean(dim=(1, 2, 3))  # (2,)
            torch.testing.assert_close(out[b, 8:], stat[:, None, None].expand(2, 4, 4))


def test_discriminator_param_count_at_256() -> None:
    torch.manual_seed(0)
    assert 28.5e6 <= n_params(Discriminator(DiscriminatorConfig(), resolution=256)) <= 29.3e6


def test_discriminator_gradient_penalty_double_backward() -> None:
    torch.manual_seed(0)
    D = Discriminator(DiscriminatorConfig(channel_base=512), resolution=32)
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    scores = D(x)
    assert scores.shape == (3,)
    (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
    assert grad.abs().sum() > 0
    gp = (grad.flatten(1).norm(dim=1) - 1).square().mean()
    gp.backward()  # second-order backward through every layer
    # The output bias shifts D(x) by a constant, so it cannot change dD/dx: the only exception.
    missing = [n for n, p in D.named_parameters() if p.grad is None and n != "out.bias"]
    assert not missing, missing
    with pytest.raises(ValueError, match="power of two"):
        Discriminator(DiscriminatorConfig(), resolution=48)


def test_decoder_is_registered() -> None:
    from brics_cli.registry import DECODERS

    assert DECODERS.get("stylegan") is StyleGANDecoder
