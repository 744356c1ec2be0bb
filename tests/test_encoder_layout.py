"""The encoder's layouts (issue 16): VQGAN's ch_mult meaning, the authors' encoder counted from its layer
list (REFERENCES Sec. 8), layout defaults versus explicit fields, and checkpoints written before the change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brics_cli.config import build, to_dict
from brics_cli.core import checkpoint as ckpt
from brics_cli.errors import BricsError
from brics_cli.models.autoencoder import BRICSAutoencoder
from brics_cli.models.encoder import Encoder, EncoderConfig
from brics_cli.recipe import load_recipe
from conftest import TINY_RECIPE

# --- parameter counts written from the layer list ------------------------------------------------


def conv(i: int, o: int, k: int) -> int:
    return i * o * k * k + o


def norm(c: int) -> int:  # GroupNorm with affine scale and shift
    return 2 * c


def resnet(i: int, o: int) -> int:  # GN, conv3x3, GN, conv3x3, 1x1 shortcut when the width changes
    return norm(i) + conv(i, o, 3) + norm(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)


def attention(c: int) -> int:  # GN, q, k, v, proj_out (1x1 convs)
    return norm(c) + 4 * conv(c, c, 1)


def encoder_params(widths, resolutions, code_resolution, C_z, res_blocks, mid, conv_out_k, unit=32) -> int:
    """conv_in -> levels (res blocks, attention at the code resolution, downsample but after the last)
    -> optional mid block -> GN -> conv_out."""
    total, c = conv(3, unit, 3), unit
    for i, (w, r) in enumerate(zip(widths, resolutions)):
        for _ in range(res_blocks):
            total += resnet(c, w) + (attention(w) if r == code_resolution else 0)
            c = w
        if i < len(widths) - 1:
            total += conv(c, c, 3)  # Downsample: 3x3 stride-2 conv
    if mid:
        total += 2 * resnet(c, c) + attention(c)
    return total + norm(c) + conv(c, C_z, conv_out_k)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_on_meta(cfg: EncoderConfig, resolution: int, code_resolution: int, out_channels: int) -> Encoder:
    with torch.device("meta"):  # sizes only: nothing is allocated
        return Encoder(cfg, resolution, code_resolution, out_channels)


def test_authors_encoder_has_their_layout_and_parameter_count():
    # REFERENCES Sec. 8 / issue 16: conv_in 32, levels of 64, 128, 256 channels at 256, 128, 64, two res
    # blocks each, attention at 64x64, two downsamplings, no mid block, 1x1 conv_out to C_z = 4.
    expected = encoder_params([64, 128, 256], [256, 128, 64], 64, C_z=4, res_blocks=2, mid=False, conv_out_k=1)
    enc = build_on_meta(EncoderConfig(layout="authors"), 256, 64, 4)
    assert count(enc) == expected
    assert round(expected / 1e6, 2) == 3.47  # the authors' "~3.47M"
    assert enc.ch_mult == [2, 4, 8] and len(enc.mid) == 0 and enc.conv_out.kernel_size == (1, 1)
    assert isinstance(enc.act, nn.LeakyReLU) and enc.act.negative_slope == 0.01
    # The KL variant asks for (mu, logvar): only conv_out grows.
    kl = build_on_meta(EncoderConfig(layout="authors"), 256, 64, 8)
    assert count(kl) - count(enc) == conv(256, 8, 1) - conv(256, 4, 1)


def test_vqgan_layout_is_the_paper_default_with_mid_block_and_3x3_conv_out():
    enc = build_on_meta(EncoderConfig(), 256, 64, 4)
    assert count(enc) == encoder_params([64, 128, 256], [256, 128, 64], 64, C_z=4, res_blocks=2, mid=True, conv_out_k=3)
    assert isinstance(enc.act, nn.SiLU) and enc.conv_out.kernel_size == (3, 3)


def test_derived_widths_follow_the_code_size():
    # null ch_mult: level i has min(512, 32 * 2^(i+1)) channels, n_down + 1 levels.
    for code_resolution, widths in ((64, [64, 128, 256]), (32, [64, 128, 256, 512]), (16, [64, 128, 256, 512, 512])):
        enc = build_on_meta(EncoderConfig(layout="authors"), 256, code_resolution, 8)
        assert [32 * m for m in enc.ch_mult] == widths
        resolutions = [256 // 2**i for i in range(len(widths))]
        assert count(enc) == encoder_params(widths, resolutions, code_resolution, 8, 2, mid=False, conv_out_k=1)


def test_explicit_fields_win_over_the_layout_and_the_stored_config_is_resolved():
    cfg = build(EncoderConfig, {"layout": "authors", "mid_block": True}, "ae.encoder")
    assert (cfg.mid_block, cfg.activation, cfg.conv_out_kernel) == (True, "leaky_relu", 1)
    stored = to_dict(build(EncoderConfig, {"layout": "authors"}, "ae.encoder"))
    assert (stored["mid_block"], stored["activation"], stored["conv_out_kernel"]) == (False, "leaky_relu", 1)
    assert build(EncoderConfig, stored, "ae.encoder") == build(EncoderConfig, {"layout": "authors"}, "ae.encoder")
    recipe = load_recipe(TINY_RECIPE, ["ae.encoder.layout=authors"])
    assert recipe.ae.encoder.mid_block is False and recipe.ae.encoder.ch_mult == [1, 2, 2]


@pytest.mark.parametrize("overrides, word", [({"layout": "ldm"}, "layout"), ({"conv_out_kernel": 2}, "conv_out_kernel")])
def test_layout_config_errors(overrides, word):
    with pytest.raises(ValueError, match=word):
        EncoderConfig(**overrides).validate()


def test_packaged_recipes_build_their_encoders_at_every_paper_code_size():
    for name in ("church", "ffhq", "webvid"):
        for code in ((64, 4), (32, 8), (16, 8)):
            recipe = load_recipe(name, [f"ae.code.resolution={code[0]}", f"ae.code.channels={code[1]}"])
            enc = build_on_meta(recipe.ae.encoder, recipe.data.resolution, code[0], code[1])
            assert enc.n_down == len(enc.ch_mult) - 1


# --- checkpoints written before ch_mult took VQGAN's meaning ----------------------------------------


def _old_checkpoint(tmp_path, ch_mult, model: BRICSAutoencoder | None = None):
    """An ae checkpoint as brics wrote it before 2026-12-02: its ae.encoder has no layout and no conv_out_kernel."""
    recipe = load_recipe(TINY_RECIPE, [f"ae.encoder.ch_mult={ch_mult}"] if model is None else [])
    config = to_dict(recipe)
    for key in ("layout", "conv_out_kernel"):
        config["ae"]["encoder"].pop(key)
    config["ae"]["encoder"]["ch_mult"] = ch_mult
    config["ae"]["decoder"].pop("style")  # the decoder's new field, too
    tensors = {f"ema.{k}": v for k, v in (model.state_dict() if model else {}).items()}
    path = tmp_path / "old.safetensors"
    ckpt.save_tensors_atomic(path, tensors or {"ema.x": torch.zeros(1)}, {"kind": "ae", "config": config,
                                                                        "decoder": {"name": "stylegan"}})
    return path


def test_old_checkpoint_with_a_short_ch_mult_loads_as_the_network_it_trained(tmp_path):
    torch.manual_seed(0)
    recipe = load_recipe(TINY_RECIPE)  # ch_mult [1, 2, 2] at 32 -> 8
    model = BRICSAutoencoder(recipe.ae, 32).eval()
    # Old brics extended [1, 2] to [1, 2, 2] for 32 -> 8: the same network, stored as [1, 2].
    path = _old_checkpoint(tmp_path, [1, 2], model)
    loaded = BRICSAutoencoder.from_checkpoint(path)
    assert loaded.encoder.ch_mult == [1, 2, 2] and loaded.cfg.decoder.style == "pooled"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).recon, model(x).recon)


def test_old_checkpoint_with_levels_without_downsampling_is_refused(tmp_path):
    path = _old_checkpoint(tmp_path, [1, 2, 2, 2])  # 4 levels for 2 downsamplings: one ran at 8x8 without
    with pytest.raises(BricsError, match=r"before 2026-12-02.*\[1, 2, 2, 2\].*without downsampling"):
        BRICSAutoencoder.from_checkpoint(path)
