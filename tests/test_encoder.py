"""Tests for the key-code encoder (paper Sec. 3.1, Suppl. A.1): shapes, size, attention placement
and maths, gradient flow, and the errors a user can hit."""

import math

import pytest
import torch

from brics_cli.models.encoder import AttnBlock, Downsample, Encoder, EncoderConfig


def tiny(**overrides) -> EncoderConfig:
    # [1, 2, 2]: three levels, two downsamplings (16 -> 4, 32 -> 8 below).
    return EncoderConfig(**{"channels": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, **overrides})


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("resolution, code_resolution", [(8, 8), (16, 8), (32, 8), (64, 4)])
def test_output_shape_for_each_ratio(resolution, code_resolution):
    torch.manual_seed(0)
    enc = Encoder(tiny(ch_mult=None), resolution, code_resolution, out_channels=5)  # derived: one level per ratio
    z = enc(torch.rand(2, 3, resolution, resolution) * 2 - 1)
    assert z.shape == (2, 5, code_resolution, code_resolution)
    n_down = int(math.log2(resolution // code_resolution))
    assert len(enc.ch_mult) == n_down + 1  # VQGAN: len(ch_mult) - 1 downsamplings
    assert sum(isinstance(m, Downsample) for m in enc.modules()) == n_down
    # The derived widths: min(512, channels * 2^(i+1)).
    assert [8 * m for m in enc.ch_mult] == [min(512, 8 * 2 ** (i + 1)) for i in range(n_down + 1)]


@pytest.mark.parametrize(
    "ch_mult, resolution, code_resolution, suggestion",
    [([1, 2, 4, 8], 256, 64, [1, 2, 4]), ([1, 2, 3], 256, 16, [1, 2, 3, 3, 3]), ([1, 2], 8, 8, [1])],
)
def test_ch_mult_of_the_wrong_length_is_refused_with_a_suggestion(ch_mult, resolution, code_resolution, suggestion):
    # Never a level without downsampling, never a silently extended list.
    cfg = EncoderConfig(channels=8, ch_mult=ch_mult, num_res_blocks=1)
    with pytest.raises(ValueError) as info:
        Encoder(cfg, resolution, code_resolution, out_channels=4)
    message = str(info.value)
    n_down = int(math.log2(resolution // code_resolution))
    assert "ae.encoder.ch_mult" in message and f"{len(ch_mult) - 1} downsampling" in message
    assert f"needs {n_down}" in message and f"ae.encoder.ch_mult={suggestion}" in message
    fixed = EncoderConfig(channels=8, ch_mult=suggestion, num_res_blocks=1)
    assert Encoder(fixed, resolution, code_resolution, out_channels=4).ch_mult == suggestion


@pytest.mark.parametrize("mid_block", [False, True])
def test_attention_only_at_code_resolution_by_default(mid_block):
    cfg = tiny(num_res_blocks=2, mid_block=mid_block)
    enc = Encoder(cfg, 32, 8, out_channels=4)
    # Levels run at 32, 16 and 8: only the last, at the code resolution, holds attention.
    expected = cfg.num_res_blocks + int(mid_block)
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
