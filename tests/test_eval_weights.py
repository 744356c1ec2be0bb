"""Offline weight files (brics_cli/nets/weights.py), the networks built on them (nets/perceptual.py) and the reconstruction metrics (eval/recon_metrics.py)."""

import hashlib

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from brics_cli.nets import weights
from brics_cli.eval.recon_metrics import psnr, reconstruction_metrics, ssim, summarise
from brics_cli.nets.perceptual import load_lpips, try_load_lpips, vgg16_features
from brics_cli.nets.weights import WeightsMismatch, WeightsMissing, require, status
from eval_fixtures import isolate_weights, save_fake_torchvision


def test_catalogue_checksums_agree_with_the_published_names():
    # torch.hub names end in the first 8 hex digits of the file's sha256; CLIP's URL holds all of it.
    for w in weights.CATALOGUE.values():
        if w.sha256 is None:  # no published checksum: DINOv2's file alone
            assert w.name == "dinov2-vit-l-14", w.name
            continue
        assert len(w.sha256) == 64 and int(w.sha256, 16) >= 0
        stem = w.filename.rsplit(".", 1)[0]
        if w.home == "torch-hub":
            assert w.sha256.startswith(stem.rsplit("-", 1)[1]), w.name
        if w.name == "clip-vit-b-32":
            assert f"/{w.sha256}/" in w.url
    needed = {"vgg16", "alexnet", "inception-fidelity", "clip-vit-b-32", "inception-cleanfid", "lpips-lin-alex", "lpips-lin-vgg",
              "dinov2-vit-l-14"}
    assert needed <= set(weights.CATALOGUE)


def test_lpips_linear_layers_in_the_wheel_match_the_recorded_sha256(monkeypatch, tmp_path):
    isolate_weights(monkeypatch, tmp_path)
    rows = {r["name"]: r for r in status()}
    for name in ("lpips-lin-alex", "lpips-lin-vgg"):
        assert rows[name]["present"] and rows[name]["sha256_ok"] is True, rows[name]
        assert hashlib.sha256(open(rows[name]["path"], "rb").read()).hexdigest() == weights.CATALOGUE[name].sha256


def test_missing_file_names_the_file_and_its_destination(monkeypatch, tmp_path):
    hub = isolate_weights(monkeypatch, tmp_path)
    with pytest.raises(WeightsMissing) as info:
        require("vgg16")
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and f"{hub}/" in message and "\n" not in message
    rows = {r["name"]: r for r in status()}
    assert rows["vgg16"]["present"] is False and rows["vgg16"]["expected_dir"] == str(hub)
    assert rows["clip-vit-b-32"]["expected_dir"] == str(tmp_path / "home" / ".cache" / "clip")
    assert rows["inception-cleanfid"]["expected_dir"] == "/tmp"
    # Several at once: one line naming all of them.
    with pytest.raises(WeightsMissing) as info:
        weights.require_all(["inception-fidelity", "clip-vit-b-32"])
    assert "weights-inception-2015-12-05-6726825d.pth" in str(info.value) and "ViT-B-32.pt" in str(info.value)


def test_brics_weights_dir_comes_first(monkeypatch, tmp_path):
    hub = isolate_weights(monkeypatch, tmp_path)
    own = tmp_path / "mine"
    monkeypatch.setenv("BRICS_WEIGHTS_DIR", str(own))
    with pytest.raises(WeightsMissing, match=str(own)):
        require("alexnet")
    # A file in the library's place is still found.
    hub.mkdir(parents=True)
    (hub / "alexnet-owt-7be5be79.pth").write_bytes(b"x")
    assert weights.locate("alexnet") == hub / "alexnet-owt-7be5be79.pth"
    own.mkdir()
    (own / "alexnet-owt-7be5be79.pth").write_bytes(b"y")
    assert weights.locate("alexnet") == own / "alexnet-owt-7be5be79.pth"


def test_checksum_mismatch_is_refused_unless_allowed(monkeypatch, tmp_path, capsys):
    hub = isolate_weights(monkeypatch, tmp_path)
    hub.mkdir(parents=True)
    (hub / "vgg16-397923af.pth").write_bytes(b"truncated download")
    with pytest.raises(WeightsMismatch, match="sha256"):
        require("vgg16")
    assert {r["name"]: r for r in status()}["vgg16"]["sha256_ok"] is False
    monkeypatch.setenv("BRICS_ALLOW_UNVERIFIED_WEIGHTS", "1")
    assert require("vgg16") == hub / "vgg16-397923af.pth"
    assert "used anyway" in capsys.readouterr().err
    assert weights.describe("vgg16")["verified"] is False


def test_lpips_without_backbone_raises_weights_missing(monkeypatch, tmp_path):
    isolate_weights(monkeypatch, tmp_path)
    with pytest.raises(WeightsMissing, match="alexnet-owt-7be5be79.pth"):
        load_lpips("alex")
    model, reason = try_load_lpips("vgg")
    assert model is None and "vgg16-397923af.pth" in reason


def test_lpips_loads_the_local_backbone(monkeypatch, tmp_path):
    """The lpips slices get torchvision's `features` layers by index: the backbone outputs must equal
    torchvision AlexNet's ReLU activations computed with the same (random) weights from the same file."""
    import torchvision

    hub = isolate_weights(monkeypatch, tmp_path)
    monkeypatch.setenv("BRICS_ALLOW_UNVERIFIED_WEIGHTS", "1")
    state = save_fake_torchvision("alexnet", hub / "alexnet-owt-7be5be79.pth", seed=3)
    model = load_lpips("alex")
    reference = torchvision.models.alexnet(weights=None)
    reference.load_state_dict(state)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        outs = model.net(model.scaling_layer(x))
        h, expected = model.scaling_layer(x), []
        for i, layer in enumerate(reference.features):
            h = layer(h)
            if i in (1, 4, 7, 9, 11):  # relu1..relu5
                expected.append(h)
        for got, want in zip(outs, expected):
            torch.testing.assert_close(got, want)
        d = model(x, x.flip(0)).flatten()
        assert d.shape == (2,) and (d > 0).all() and model(x, x).abs().max() < 1e-6


def test_vgg16_features_match_torchvision(monkeypatch, tmp_path):
    import torchvision

    hub = isolate_weights(monkeypatch, tmp_path)
    with pytest.raises(WeightsMissing, match="vgg16-397923af.pth"):
        vgg16_features()
    monkeypatch.setenv("BRICS_ALLOW_UNVERIFIED_WEIGHTS", "1")
    state = save_fake_torchvision("vgg16", hub / "vgg16-397923af.pth", seed=1)
    f = vgg16_features(layers=("relu2_2", "relu1_2"))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.device("meta"):
        reference = torchvision.models.vgg16(weights=None)
    reference.load_state_dict(state, assign=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        relu2_2, relu1_2 = f(x)
        torch.testing.assert_close(relu1_2, reference.features[:4](((x + 1) / 2 - mean) / std))
        torch.testing.assert_close(relu2_2, reference.features[:9](((x + 1) / 2 - mean) / std))
    assert not any(p.requires_grad for p in f.parameters())


def _pair(seed=0, n=3, h=40, w=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(n, 3, h, w, generator=g)).clamp(-1, 1)
    return x, y


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) of (H, W, 3) images in [0, 1]: Gaussian sigma 1.5 truncated at radius 5,
    borders mirrored, averaged over EVERY pixel -- torchmetrics' convention (scikit-image instead drops
    a 5-pixel border before averaging)."""
    from scipy.ndimage import gaussian_filter

    def blur(img):
        return np.stack([gaussian_filter(img[..., c], 1.5, mode="mirror", truncate=3.5) for c in range(3)], -1)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    ssim_map = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def test_psnr_and_ssim_match_references():
    x, y = _pair()
    p, s = psnr(x, y), ssim(x, y)
    assert p.shape == s.shape == (3,)
    for i in range(3):
        a = ((x[i].double() + 1) / 2).permute(1, 2, 0).numpy()
        b = ((y[i].double() + 1) / 2).permute(1, 2, 0).numpy()
        assert p[i].item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-4)
        assert s[i].item() == pytest.approx(ssim_reference(a, b), abs=1e-5)
        # scikit-image differs only by leaving out the border: close, not equal.
        ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=2)
        assert s[i].item() == pytest.approx(ref, abs=3e-3)


def test_summarise_and_reconstruction_metrics_shape():
    assert summarise([1.0, 2.0, 4.0]) == pytest.approx({"mean": 7 / 3, "std": float(np.std([1.0, 2.0, 4.0]))})
    x, y = _pair(n=5)
    whole = reconstruction_metrics(x, y)
    batched = reconstruction_metrics([x[:2], x[2:]], [y[:2], y[2:]], lpips_unavailable="no weights here")
    assert whole["n"] == 5 and whole["lpips"] is None and "lpips_unavailable" in whole
    assert batched["lpips_unavailable"] == "no weights here"
    for key in ("psnr", "ssim"):
        assert batched[key] == pytest.approx(whole[key])
        assert whole[key]["mean"] == pytest.approx((psnr if key == "psnr" else ssim)(y, x).double().mean().item(), rel=1e-6)


def test_reconstruction_metrics_with_lpips(monkeypatch, tmp_path):
    hub = isolate_weights(monkeypatch, tmp_path)
    monkeypatch.setenv("BRICS_ALLOW_UNVERIFIED_WEIGHTS", "1")
    save_fake_torchvision("alexnet", hub / "alexnet-owt-7be5be79.pth")
    model = load_lpips("alex")
    x, y = _pair(n=4, h=64, w=64)
    result = reconstruction_metrics(x, y, lpips_model=model)
    with torch.no_grad():
        per_image = model(y, x).flatten()
    assert "lpips_unavailable" not in result
    assert result["lpips"] == pytest.approx(summarise(per_image))
