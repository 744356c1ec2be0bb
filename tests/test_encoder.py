"""Tests for the key-code encoder (paper Sec. 3.1, Suppl. A.1): shapes, size, attention placement
and maths, gradient flow, and the errors a user can hit."""

import math

import pytest
import torch

from brics_cli.models.encoder import AttnBlock, Downsample, Encoder, EncoderConfig


def tiny(**overrides) -> EncoderConfig:
    return EncoderConfig(**{"channels": 8, "ch_mult": [1, 2], "num_res_blocks": 1, **overrides})


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("resolution, code_resolution", [(8, 8), (16, 8), (32, 8), (64, 4)])
def test_output_shape_for_each_ratio(resolution, code_resolution):
    torch.manual_seed(0)
    enc = Encoder(tiny(), resolution, code_resolution, out_channels=5)
    z = enc(torch.rand(2, 3, resolution, resolution) * 2 - 1)
    assert z.shape == (2, 5, code_resolution, code_resolution)
    assert len(enc.ch_mult) == max(2, enc.n_down + 1)  # ch_mult is extended only when too short
    assert sum(isinstance(m, Downsample) for m in enc.modules()) == math.log2(resolution // code_resolution)


def test_short_ch_mult_repeats_last_multiplier():
    enc = Encoder(EncoderConfig(channels=8, ch_mult=[1, 2, 3], num_res_blocks=1), 256, 16, 4)
    assert enc.ch_mult == [1, 2, 3, 3, 3]  # 4 downsamples need 5 levels
    assert enc.conv_out.in_channels == 8 * 3


def test_default_size_matches_authors_encoder():
    # REFERENCES Sec. 8: the authors' 256 -> 64x64x4 encoder has ~3.47M parameters.
    n = count_params(Encoder(EncoderConfig(mid_block=False), 256, 64, out_channels=4))
    assert abs(n - 3.47e6) / 3.47e6 < 0.15, n
    # VQGAN's mid block (ResnetBlock, AttnBlock, ResnetBlock at 256 channels) is what the option adds.
    c = 256
    resnet = 2 * (9 * c * c + c) + 4 * c
    attn = 4 * (c * c + c) + 2 * c
    with_mid = count_params(Encoder(EncoderConfig(mid_block=True), 256, 64, out_channels=4))
    assert with_mid - n == 2 * resnet + attn


@pytest.mark.parametrize("mid_block", [False, True])
def test_attention_only_at_code_resolution_by_default(mid_block):
    cfg = tiny(num_res_blocks=2, mid_block=mid_block)
    enc = Encoder(cfg, 32, 8, out_channels=4)
    # Levels run at 32, 16, then 8 for every level after the n_down-th: those hold the attention.
    levels_at_code_res = len(enc.ch_mult) - enc.n_down
    expected = cfg.num_res_blocks * levels_at_code_res + int(mid_block)
    assert sum(isinstance(m, AttnBlock) for m in enc.modules()) == expected
    for i, level in enumerate(enc.down):
        has_attn = [isinstance(a, AttnBlock) for a in level.attn]
        assert has_attn == [i >= enc.n_down] * cfg.num_res_blocks, i


def test_explicit_attn_resolutions_and_no_mid_attention():
    cfg = tiny(num_res_blocks=2, attn_resolutions=[16], mid_block=True, mid_attention=False)
    enc = Encoder(cfg, 32, 8, out_channels=4)
    attn_levels = [i for i, lv in enumerate(enc.down) if any(isinstance(a, AttnBlock) for a in lv.attn)]
    assert attn_levels == [1]  # level 1 runs at 16x16
    assert sum(isinstance(m, AttnBlock) for m in enc.modules()) == cfg.num_res_blocks


def test_attn_block_matches_naive_softmax_attention():
    torch.manual_seed(0)
    block = AttnBlock(16).double()
    for p in block.parameters():  # non-trivial affine GroupNorm and biases
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16, 5, 3, dtype=torch.float64)
    B, C, H, W = x.shape
    h = block.norm(x)
    q, k, v = (conv(h).reshape(B, C, H * W) for conv in (block.q, block.k, block.v))  # (B, C, N)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=-1)  # (B, N, N)
    out = torch.einsum("bij,bcj->bci", weights, v).reshape(B, C, H, W)
    expected = x + block.proj_out(out)
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("activation, mid_block", [("silu", True), ("leaky_relu", False)])
def test_gradients_reach_input_and_every_parameter(activation, mid_block):
    torch.manual_seed(0)
    enc = Encoder(tiny(activation=activation, mid_block=mid_block, dropout=0.1), 16, 4, out_channels=3)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    torch.sigmoid(enc(x)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("resolution, code_resolution", [(48, 16), (16, 32), (64, 0), (64, 24)])
def test_bad_ratio_names_both_numbers(resolution, code_resolution):
    with pytest.raises(ValueError) as info:
        Encoder(tiny(), resolution, code_resolution, out_channels=4)
    assert str(resolution) in str(info.value) and str(code_resolution) in str(info.value)


@pytest.mark.parametrize(
    "overrides, word",
    [
        ({"channels": 0}, "channels"),
        ({"ch_mult": []}, "ch_mult"),
        ({"ch_mult": [1, 0]}, "ch_mult"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"activation": "relu"}, "activation"),
    ],
)
def test_config_validation(overrides, word):
    with pytest.raises(ValueError, match=word):
        tiny(**overrides).validate()
