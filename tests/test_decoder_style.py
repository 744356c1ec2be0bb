"""The stylegan decoder's style code: `pooled` (the paper, default) and `per-group` (the authors' code,
REFERENCES Sec. 8): shapes, that group g's style sees only group g's channels of f, the mapping's size
from its layer shapes, and how the autoencoder tells the decoder N_h."""

from __future__ import annotations

import pytest
import torch

from brics_cli.models.autoencoder import BRICSAutoencoder
from brics_cli.models.decoder import StyleGANDecoder, StyleGANDecoderConfig
from brics_cli.models.layers import EqualLinear
from brics_cli.recipe import load_recipe
from conftest import TINY_RECIPE


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def equal_linear(i: int, o: int) -> int:
    return i * o + o  # weight and bias


def per_group(in_channels=32, groups=4, **overrides) -> StyleGANDecoder:
    cfg = StyleGANDecoderConfig(channel_base=256, style="per-group", **overrides)
    return StyleGANDecoder(cfg, in_channels, in_resolution=8, out_resolution=16, groups=groups)


def test_per_group_style_shape_and_that_each_group_sees_only_its_channels():
    torch.manual_seed(0)
    dec, G, C_d = per_group(), 4, 32
    f = torch.randn(2, C_d, 8, 8, requires_grad=True)
    w = dec.style(f)
    assert w.shape == (2, C_d)  # N_h styles of C_d / N_h, concatenated in group order
    chunk = C_d // G
    for g in range(G):
        (grad,) = torch.autograd.grad(w[:, g * chunk : (g + 1) * chunk].sum(), f, retain_graph=True)
        by_channel = grad.abs().sum(dim=(0, 2, 3))  # (C_d,)
        assert (by_channel[g * chunk : (g + 1) * chunk] > 0).all(), g
        assert by_channel[: g * chunk].sum() == 0 and by_channel[(g + 1) * chunk :].sum() == 0, g
    # Against the recipe written out: pool group g, RMS-normalise, its own 3 layers.
    s = f.mean(dim=(2, 3))[:, :chunk]
    s = s * torch.rsqrt(s.square().mean(1, keepdim=True) + 1e-8)
    torch.testing.assert_close(w[:, :chunk], dec.mapping[0](s))


def test_pooled_style_mixes_every_channel():
    torch.manual_seed(0)
    dec = StyleGANDecoder(StyleGANDecoderConfig(channel_base=256), 32, 8, 16, groups=4)  # groups unused
    f = torch.randn(2, 32, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(dec.style(f)[:, :8].sum(), f)
    assert (grad.abs().sum(dim=(0, 2, 3)) > 0).all()


def test_per_group_mapping_size_from_its_layer_shapes_at_the_paper_size():
    # C_d = 512, N_h = 4: four 3-layer mappings of 128 -> 128 (the authors' 4 x 128 = 512 style).
    with torch.device("meta"):
        dec = StyleGANDecoder(StyleGANDecoderConfig(style="per-group"), 512, 64, 256, groups=4)
        pooled = StyleGANDecoder(StyleGANDecoderConfig(), 512, 64, 256)
    assert n_params(dec.mapping) == 4 * 3 * equal_linear(128, 128)
    assert n_params(pooled.mapping) == 3 * equal_linear(512, 512)
    assert n_params(dec.blocks) == n_params(pooled.blocks) == 9_445_521  # the synthesis is unchanged
    layers = [m for m in dec.mapping.modules() if isinstance(m, EqualLinear)]
    assert len(layers) == 12 and all(m.lr_mul == 0.01 and m.weight.shape == (128, 128) for m in layers)


def test_the_autoencoder_passes_the_number_of_groups():
    torch.manual_seed(0)
    recipe = load_recipe(TINY_RECIPE, ["ae.decoder.style=per-group"])  # C_z 4, C_key 1: N_h = 4, C_d = 32
    ae = BRICSAutoencoder(recipe.ae, 32).eval()
    assert ae.decoder.groups == 4 and len(ae.decoder.mapping) == 4
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert ae(x).recon.shape == (2, 3, 32, 32)
    assert load_recipe(TINY_RECIPE).ae.decoder.style == "pooled"


def test_per_group_inference_path_matches_training_path():
    torch.manual_seed(0)
    dec = per_group(noise=False).eval()
    for p in dec.parameters():
        torch.nn.init.normal_(p, std=0.5)
    f = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        fast = dec(f)
    torch.testing.assert_close(fast, dec._synthesize(f, dec.style(f)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_channels, groups", [(30, 4), (32, 0)])
def test_per_group_needs_channels_divisible_by_groups(in_channels, groups):
    with pytest.raises(ValueError, match="per-group"):
        per_group(in_channels=in_channels, groups=groups)


def test_style_config_errors():
    with pytest.raises(ValueError, match="ae.decoder.style"):
        StyleGANDecoderConfig(style="grouped").validate()
