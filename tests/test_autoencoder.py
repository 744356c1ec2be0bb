"""Key codes, tiling, relaxed precision and the whole autoencoder (paper Sec. 3, Eq. 1, Sec. 3.4)."""

import numpy as np
import pytest
import torch

from brics_cli.models.autoencoder import AutoencoderConfig, BRICSAutoencoder, CodeConfig, FeatureBlockConfig
from brics_cli.models.encoder import EncoderConfig
from brics_cli.models.grid import GridConfig
from brics_cli.models.keycode import key_queries, pixel_centre_coords, tile_key_codes
from brics_cli.models.retrieval import MLPConfig
from brics_cli.registry import DECODERS


def tiny_config(**code) -> AutoencoderConfig:
    code = {"resolution": 8, "channels": 4, **code}
    return AutoencoderConfig(
        code=CodeConfig(**code),
        features=FeatureBlockConfig(resolution=16, channels=32),
        # 32x32 images: one level per downsampling plus one (VQGAN's ch_mult meaning).
        encoder=EncoderConfig(channels=8, ch_mult={8: [1, 2, 2], 16: [1, 2]}[code["resolution"]], num_res_blocks=1),
        grid=GridConfig(levels=4, r_min=4, r_max=32, log2_table_size=12),
        mlp=MLPConfig(hidden=16),
        decoder=DECODERS.get("stylegan").Config(channel_base=256, channel_max=32, mapping_layers=1),
    )


@pytest.mark.parametrize("s", [1, 2, 4])
def test_interleaved_tiling_repeats_each_code_in_an_s_by_s_block(s):
    z = torch.rand(2, 3, 4, 5)
    t = tile_key_codes(z, (4 * s, 5 * s), "interleaved")
    for i in range(4 * s):
        for j in range(5 * s):
            assert torch.equal(t[:, :, i, j], z[:, :, i // s, j // s])


@pytest.mark.parametrize("s", [1, 2, 4])
def test_whole_tiling_repeats_the_map(s):
    z = torch.rand(2, 3, 4, 5)
    t = tile_key_codes(z, (4 * s, 5 * s), "whole")
    for i in range(4 * s):
        for j in range(5 * s):
            assert torch.equal(t[:, :, i, j], z[:, :, i % 4, j % 5])


def test_tiling_rejects_non_multiples():
    with pytest.raises(ValueError, match="6x6"):
        tile_key_codes(torch.rand(1, 1, 4, 4), (6, 6))


def test_queries_are_key_slices_then_pixel_centre_coordinates():
    B, C_key, N_h, H, W = 2, 2, 3, 4, 5
    z_hat = torch.rand(B, N_h * C_key, H, W)
    q = key_queries(z_hat, C_key)  # (N_h, B H W, C_key + 2)
    assert q.shape == (N_h, B * H * W, C_key + 2)
    for s in range(N_h):
        for b in range(B):
            for i in range(H):
                for j in range(W):
                    row = q[s, (b * H + i) * W + j]
                    assert torch.equal(row[:C_key], z_hat[b, s * C_key : (s + 1) * C_key, i, j])
                    torch.testing.assert_close(row[C_key:], torch.tensor([(j + 0.5) / W, (i + 0.5) / H]))
    coords = pixel_centre_coords(H, W)
    assert coords.min() > 0 and coords.max() < 1


def test_codes_lie_in_unit_interval():
    ae = BRICSAutoencoder(tiny_config(), 32)
    z, kl = ae.encode(torch.randn(3, 3, 32, 32) * 3)
    assert z.shape == (3, 4, 8, 8) and kl is None
    assert z.min() >= 0 and z.max() <= 1


def _captured_queries(ae, z):
    """The Eq. 1 queries the retrieval module builds from the (noised) tiled codes it receives."""
    seen = []
    handle = ae.retrieval.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        ae.features(z)
    handle.remove()
    return key_queries(seen[0], ae.cfg.code.key_channels)


def test_relaxed_precision_noise_std_in_train_mode_and_zero_in_eval():
    torch.manual_seed(0)
    cfg = tiny_config(resolution=16, channels=4)
    ae = BRICSAutoencoder(cfg, 32)
    z = torch.full((100, 4, 16, 16), 0.5)  # away from the [0,1] clip; 102,400 draws
    clean = key_queries(tile_key_codes(z, (16, 16)), 1)
    ae.train()
    noisy = _captured_queries(ae, z)
    eps = (noisy - clean)[..., 0]  # key slice only: coordinates are never perturbed
    assert eps.numel() >= 100_000
    sigma = 1 / (4 * cfg.r_max)  # 1/128 for r_max = 32
    assert abs(eps.std().item() - sigma) / sigma < 0.05
    assert torch.equal(noisy[..., 1:], clean[..., 1:])
    ae.eval()
    assert torch.equal(_captured_queries(ae, z), clean)


def test_no_noise_for_kl_and_none_bottlenecks():
    z = torch.full((2, 4, 8, 8), 0.5)
    for bottleneck in ("kl", "none"):
        ae = BRICSAutoencoder(tiny_config(bottleneck=bottleneck), 32).train()
        assert torch.equal(_captured_queries(ae, z), key_queries(tile_key_codes(z, (16, 16)), 1))


def test_kl_bottleneck_samples_in_training_and_uses_the_mean_in_eval():
    torch.manual_seed(0)
    ae = BRICSAutoencoder(tiny_config(bottleneck="kl"), 32)
    x = torch.randn(2, 3, 32, 32)
    assert ae.encoder.conv_out.out_channels == 8  # mu and log-variance for C_z = 4
    ae.train()
    z1, kl = ae.encode(x)
    z2, _ = ae.encode(x)
    assert not torch.equal(z1, z2) and kl.shape == (2,) and (kl >= 0).all()
    ae.eval()
    z3, _ = ae.encode(x)
    mu, logvar = ae.encoder(x).chunk(2, dim=1)
    torch.testing.assert_close(z3, torch.sigmoid(mu))
    expected = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    torch.testing.assert_close(ae.encode(x)[1], expected)


def test_reconstruction_gradients_reach_tables_key_codes_and_encoder():
    torch.manual_seed(0)
    ae = BRICSAutoencoder(tiny_config(), 32).train()
    x = torch.randn(2, 3, 32, 32)
    z, _ = ae.encode(x)
    z.retain_grad()
    recon = ae.decode(z)
    (recon - x).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # the key codes are trained through retrieval
    assert ae.retrieval.grids.tables.grad.abs().sum() > 0
    for name, p in ae.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _real_crops(n: int, size: int) -> torch.Tensor:
    """Crops of the colour photos scikit-image ships in its wheel (no download), in [-1, 1]."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(0)
    crops = []
    for k in range(n):
        im = photos[k % len(photos)]
        h, w = im.shape[:2]
        s = min(h, w) // 3
        y, x = rng.integers(0, h - s), rng.integers(0, w - s)
        crop = torch.tensor(im[y : y + s, x : x + s]).permute(2, 0, 1).float()[None] / 127.5 - 1
        crops.append(torch.nn.functional.interpolate(crop, size=size, mode="area"))
    return torch.cat(crops)


def test_tiny_autoencoder_overfits_eight_real_images_to_30db():
    """L2 only, relaxed precision on: the bi-level representation can store 8 real 32x32 crops."""
    torch.manual_seed(0)
    x = _real_crops(8, 32)
    cfg = AutoencoderConfig(
        code=CodeConfig(resolution=16, channels=4),
        features=FeatureBlockConfig(resolution=16, channels=64),
        encoder=EncoderConfig(channels=16, ch_mult=[1, 2], num_res_blocks=1),
        grid=GridConfig(levels=6, r_min=4, r_max=64, log2_table_size=14),  # sigma = 1/256
        mlp=MLPConfig(hidden=32),
        decoder=DECODERS.get("stylegan").Config(channel_base=512, channel_max=64, mapping_layers=2),
    )
    ae = BRICSAutoencoder(cfg, 32)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3, betas=(0.9, 0.99), eps=1e-15)
    best = 0.0
    for step in range(1, 701):
        loss = (ae(x).recon - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            ae.eval()
            with torch.no_grad():
                mse = (ae(x).recon.clamp(-1, 1) - x).square().mean()
            ae.train()
            best = max(best, 10 * torch.log10(4 / mse).item())  # PSNR for a [-1, 1] range
            if best >= 30:
                break
    assert best >= 30, f"PSNR {best:.2f} dB after {step} steps"


@pytest.mark.parametrize("interpolation", ["gather", "separable"])
def test_feature_block_channels_belong_to_their_group(interpolation):
    """Group s owns channels [s C_d/N_h, (s+1) C_d/N_h) of f and sees only its own key slice (Sec. 3.2)."""
    from brics_cli.models.retrieval import FeatureRetrieval

    torch.manual_seed(0)
    grid = GridConfig(levels=3, r_min=4, r_max=16, log2_table_size=10, init_scale=0.5, interpolation=interpolation)
    retrieval = FeatureRetrieval(grid, MLPConfig(hidden=8), groups=4, key_channels=1, r_max=16, channels=32)
    z_hat = torch.rand(2, 4, 8, 8)
    f = retrieval(z_hat)
    bumped = z_hat.clone()
    bumped[:, 2] = torch.rand(2, 8, 8)
    changed = (retrieval(bumped) - f).abs().amax(dim=(0, 2, 3)) > 0  # per channel
    assert changed.tolist() == [False] * 16 + [True] * 8 + [False] * 8


def test_gather_and_separable_paths_agree_through_the_autoencoder():
    torch.manual_seed(0)
    ae = BRICSAutoencoder(tiny_config(), 32).eval()
    z = torch.rand(3, 4, 8, 8, requires_grad=True)
    outs, grads = [], []
    for mode in ("gather", "separable"):
        ae.retrieval.interpolation = mode
        f = ae.features(z)
        (g,) = torch.autograd.grad(f.square().sum(), z)
        outs.append(f)
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_modulated_mlp_matches_per_sample_reference_and_is_image_global():
    """The authors' modulated F_mlp: weights scaled by a style from the group's pooled features, demodulated."""
    from brics_cli.models.retrieval import GroupedMLP

    torch.manual_seed(0)
    G, B, N_img, D_in = 2, 3, 5, 6
    mlp = GroupedMLP(MLPConfig(hidden=4, layers=2, modulated=True), G, D_in, 3)
    h = torch.randn(G, B * N_img, D_in)
    out = mlp(h, B)

    style = h.view(G, B, N_img, D_in).mean(2)
    ref = torch.empty_like(out)
    for g in range(G):
        for b in range(B):
            x = h[g, b * N_img : (b + 1) * N_img]
            for i, layer in enumerate(mlp.layers):
                s = style[g, b] @ mlp.affines[i].weight[g] + mlp.affines[i].bias[g, 0]
                w = layer.weight[g] * s[:, None]  # (in, out)
                x = (x @ w) * torch.rsqrt(w.square().sum(0) + 1e-8) + layer.bias[g, 0]
                if i < len(mlp.layers) - 1:
                    x = torch.nn.functional.leaky_relu(x, 0.01)
            ref[g, b * N_img : (b + 1) * N_img] = x
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

    h2 = h.clone()
    h2[:, 1] += 1.0  # another position of image 0
    assert (mlp(h2, B)[:, 0] - out[:, 0]).abs().max() > 1e-4  # the style is global to the image
    plain = GroupedMLP(MLPConfig(hidden=4, layers=2), G, D_in, 3)
    assert torch.equal(plain(h2, B)[:, 0], plain(h, B)[:, 0])
