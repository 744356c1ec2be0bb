"""The decoder plugins brics-vqgan and brics-movq (plugins/): discovery, size, behaviour, training.

Both must be installed: `pip install -e plugins/brics-vqgan -e plugins/brics-movq`.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.flop_counter import FlopCounterMode

from brics_cli.registry import DECODERS

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = {"vqgan": ("brics-vqgan", "brics_vqgan.decoder"), "movq": ("brics-movq", "brics_movq.decoder")}
SMALL = dict(ch=32, ch_mult=[1, 2], attn_resolutions=[8])  # 8x8x16 -> 16x16x3


def _small(name, in_channels=16):
    cls = DECODERS.get(name)
    return cls(cls.Config(**SMALL), in_channels, 8, 16)


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_resolves_through_entry_point_with_distribution(name):
    dist, module = PLUGINS[name]
    cls = DECODERS.get(name)
    entry = {e.name: e for e in DECODERS.entries()}[name]
    assert (entry.distribution, entry.version, entry.module) == (dist, "0.1.0", module)
    assert cls.__module__ == module and cls.Config().name == name


def test_vqgan_f16_params_and_macs():
    cls = DECODERS.get("vqgan")
    with torch.device("meta"):
        dec = cls(cls.Config(), 256, 16, 256)  # taming f16: z_channels 256, 16x16 -> 256x256
        params = sum(p.numel() for p in dec.parameters())
        with FlopCounterMode(display=False) as counter:
            out = dec(torch.empty(1, 256, 16, 16))
    gmac = counter.get_total_flops() / 2e9
    print(f"VQGAN f16 decoder: {params:,} params, {gmac:.1f} GMAC at batch 1")
    assert out.shape == (1, 3, 256, 256)
    assert 38e6 <= params <= 44e6  # REFERENCES Sec. 4: 42.5M (taming)
    assert 115 <= gmac <= 135  # REFERENCES Sec. 4: 126.4 by hand, 125.3 with flop_counter (diffusers)


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_validation_errors(name):
    cls = DECODERS.get(name)
    with pytest.raises(ValueError, match=r"16 -> 64.*\[1, 1, 2, 2, 4\]"):
        cls(cls.Config(ch_mult=[1, 1, 2, 2, 4]), 8, 16, 64)  # 2 upsamplings but ch_mult has 5 levels
    with pytest.raises(ValueError, match=r"8 -> 512 \(6 x2 steps\).*more than f16's 4"):
        cls(cls.Config(), 8, 8, 512)  # ch_mult null: f16's widths cover at most 4 upsamplings
    assert cls(cls.Config(), 16, 64, 256).cfg.ch_mult == [2, 2, 4]  # the paper's 64x64 block: f16's last three widths
    assert cls(cls.Config(), 16, 16, 256).cfg.ch_mult == [1, 1, 2, 2, 4]  # 16 -> 256: f16 itself
    with pytest.raises(ValueError, match="power of two"):
        cls(cls.Config(**SMALL), 16, 8, 24)
    with pytest.raises(ValueError, match="multiples of 32"):
        cls.Config(ch=48).validate()
    with pytest.raises(ValueError, match="dropout"):
        cls.Config(dropout=1.5).validate()


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_small_forward_shape_and_gradients_everywhere(name):
    torch.manual_seed(0)
    dec = _small(name)
    f = torch.randn(2, 16, 8, 8, requires_grad=True)
    out = dec(f)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    missing = [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    with pytest.raises(ValueError, match=r"\(B, 16, 8, 8\)"):
        dec(torch.randn(2, 16, 4, 4))


def test_movq_spatial_norm_is_conditioned_on_zq():
    from brics_movq.decoder import SpatialNorm

    torch.manual_seed(0)
    sn = SpatialNorm(32, 16)
    h = torch.randn(2, 32, 8, 8)
    zq, zq_other = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    # GN alone cannot tell h from 3h + 1 ...
    assert torch.allclose(sn(h, zq), sn(3 * h + 1, zq), atol=1e-4)
    # ... but the spatial pattern of zq (resized nearest to 8x8) changes the output,
    assert not torch.allclose(sn(h, zq), sn(h, zq_other), atol=1e-3)
    ref = F.group_norm(h, 32, eps=1e-6) * sn.conv_y(F.interpolate(zq, size=(8, 8))) + sn.conv_b(
        F.interpolate(zq, size=(8, 8))
    )
    assert torch.allclose(sn(h, zq), ref, atol=1e-5)
    # and in the whole decoder every SpatialNorm's 1x1 convs learn.
    dec = _small("movq")
    dec(torch.randn(2, 16, 8, 8)).square().mean().backward()
    norms = [m for m in dec.modules() if isinstance(m, SpatialNorm)]
    assert len(norms) == 2 * 2 * 3 + 2 + 3 + 3 + 1  # res blocks (mid 2 + levels 6) x2, attn 1 + 3, out 1
    assert all(m.conv_y.weight.grad.abs().sum() > 0 and m.conv_b.weight.grad.abs().sum() > 0 for m in norms)
    assert not any(p.requires_grad for m in norms for p in m.norm.parameters())  # GN has affine=False


@pytest.mark.parametrize("module", ["brics_vqgan.decoder", "brics_movq.decoder"])
def test_attention_equals_naive_softmax(module):
    mod = __import__(module, fromlist=["AttnBlock"])
    torch.manual_seed(0)
    c, hw = 32, 6
    x = torch.randn(2, c, hw, hw)
    if module == "brics_vqgan.decoder":
        attn = mod.AttnBlock(c)
        out, y = attn(x), attn.norm(x)
    else:
        zq = torch.randn(2, 16, 3, 3)
        attn = mod.AttnBlock(c, 16)
        out, y = attn(x, zq), attn.norm(x, zq)
    q, k, v = (t.flatten(2) for t in (attn.q(y), attn.k(y), attn.v(y)))  # (B, C, N)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)  # (B, N_q, N_k)
    ref = x + attn.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(x.shape))
    assert torch.allclose(out, ref, atol=1e-5)


def _smooth_targets(generator):
    """4 smooth 'real-looking' images in [-1, 1]: low-frequency noise upsampled bicubically."""
    coarse = torch.rand(4, 3, 4, 4, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(16, 16), mode="bicubic", align_corners=False).clamp(-1, 1)


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_overfits_fixed_features_to_targets(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    f = torch.randn(4, 16, 8, 8, generator=g)
    target = _smooth_targets(g)
    dec = _small(name)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
    first = F.mse_loss(dec(f), target).item()
    for step in range(1, 301):
        loss = F.mse_loss(dec(f), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < first / 20:
            break
    final = F.mse_loss(dec(f), target).item()
    print(f"{name}: MSE {first:.4f} -> {final:.5f} in {step} Adam steps")
    assert final <= first / 10  # MSE falls by at least 10x


def test_brics_info_reports_the_plugin_decoder(tmp_path):
    # Overriding only ae.decoder.name would keep the demo's stylegan keys (channel_base, ...), which
    # the plugin's Config rejects as unknown; so the recipe's decoder section is reduced to its name.
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    recipe["ae"]["decoder"] = {"name": "stylegan"}
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    procs = {}
    for name in sorted(PLUGINS):  # both at once: `brics info` takes ~5 s of CPU each
        overrides = [f"ae.decoder.name={name}", "ae.decoder.ch=32", "ae.decoder.ch_mult=[1,2,4]",
                     "ae.decoder.attn_resolutions=[16]"]
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "brics_cli", "info", str(path), *overrides, "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        report = json.loads(stdout.strip().splitlines()[-1])
        assert report["config"]["ae"]["decoder"]["name"] == name
        decoder = report["components"]["decoder"]
        print(f"brics info, {name} decoder (16x16x128 -> 64x64): {decoder['params']:,} params")
        assert decoder["params"] > 0 and decoder["macs"] > 0


def test_switching_decoder_is_one_override():
    from brics_cli.errors import ConfigError
    from brics_cli.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    cfg = load_recipe(root / "recipes/demo.yaml", ["ae.decoder.name=vqgan"])
    assert cfg.ae.decoder.name == "vqgan" and not hasattr(cfg.ae.decoder, "channel_base")
    with pytest.raises(ConfigError, match="channel_base"):
        load_recipe(root / "recipes/demo.yaml", ["ae.decoder.name=vqgan", "ae.decoder.channel_base=4"])
