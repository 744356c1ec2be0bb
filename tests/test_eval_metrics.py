"""Generative metric arithmetic (brics_cli/eval/metrics.py) against the libraries the paper used and a
brute-force precision/recall, on features of real photos from a real network with fixed random weights
plugged in as the feature extractor (brics_cli/eval/features.py, generative.py)."""

import numpy as np
import pytest
import torch
from torch import nn

from brics_cli.data.sources.demo import demo_photo
from brics_cli.eval import metrics as M
from brics_cli.eval.features import Extractor, extract
from brics_cli.eval.generative import evaluate
from brics_cli.eval.image_sets import load_reference, load_samples
from eval_fixtures import make_samples, write_pngs


class RandomFeatureNet(nn.Module):
    """A small CNN with fixed random weights: uint8 images -> 48-d pooled features and 10 logits,
    returned under the names given (the production extractors' names when plugged into `evaluate`)."""

    def __init__(self, seed: int = 0, pool: str = "pool", logits: str = "logits"):
        super().__init__()
        self.names = (pool, logits)
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2), nn.ReLU(), nn.Conv2d(16, 24, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(96, 48),
        )
        self.head = nn.Linear(48, 10)
        self.calls = 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict:
        self.calls += 1
        x = nn.functional.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear", align_corners=False)
        pool = self.body(x)
        return dict(zip(self.names, (pool, 3 * self.head(pool))))


def photo_crops(n: int, seed: int, size: int = 32, noise: float = 0.0) -> np.ndarray:
    """Random crops of the real photos scikit-image ships, (n, size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    photos = [np.asarray(demo_photo(name).convert("RGB")) for name in ("astronaut", "chelsea", "coffee", "rocket")]
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        s = int(rng.integers(40, 120))
        y, x = rng.integers(0, p.shape[0] - s), rng.integers(0, p.shape[1] - s)
        crop = torch.from_numpy(p[y : y + s, x : x + s].copy()).permute(2, 0, 1)[None].float()
        crop = nn.functional.interpolate(crop, size=(size, size), mode="area")[0].permute(1, 2, 0).numpy()
        out.append(np.clip(crop + noise * rng.standard_normal(crop.shape) * 255, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def features():
    net = RandomFeatureNet()
    real = torch.from_numpy(photo_crops(120, seed=1)).permute(0, 3, 1, 2)
    fake = torch.from_numpy(photo_crops(100, seed=2, noise=0.08)).permute(0, 3, 1, 2)
    return {name: t.double().numpy() for name, t in net(real).items()}, {name: t.double().numpy() for name, t in net(fake).items()}


def test_fid_equals_clean_fid_frechet_distance(features):
    from cleanfid.fid import frechet_distance
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    real, fake = features
    mu1, s1 = np.mean(fake["pool"], 0), np.cov(fake["pool"], rowvar=False)
    mu2, s2 = np.mean(real["pool"], 0), np.cov(real["pool"], rowvar=False)
    ours = M.fid(fake["pool"], real["pool"])
    assert ours == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-9)
    assert ours > 0
    fidelity = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)["frechet_inception_distance"]
    assert ours == pytest.approx(fidelity, rel=1e-6)  # torch-fidelity takes the trace by eigenvalues
    assert M.fid(real["pool"], real["pool"]) == pytest.approx(0, abs=1e-6)


def test_fid_with_fewer_samples_than_dimensions(features):
    """With N <= D, brics takes the trace term from an N x N matrix: same value as the D x D route."""
    from cleanfid.fid import frechet_distance

    real, fake = features
    few = fake["pool"][:20]  # 20 samples of 48-d features: a singular covariance
    stats = M.feature_statistics(few), M.feature_statistics(real["pool"])
    ours = M.fid(few, real["pool"])
    # FID is a small difference of traces, and the D x D routes take square roots of eigenvalues that are
    # zero up to round-off (sqrt(1e-17) ~ 3e-9 each), so they agree to ~1e-7 of the traces.
    scale = float(stats[0][1].trace() + stats[1][1].trace())
    assert ours == pytest.approx(M.frechet_distance(*stats[0], *stats[1]), abs=1e-7 * scale)
    cf = frechet_distance(np.mean(few, 0), np.cov(few, rowvar=False), np.mean(real["pool"], 0), np.cov(real["pool"], rowvar=False))
    assert ours == pytest.approx(cf, abs=1e-7 * scale)


def test_inception_score_matches_torch_fidelity(features):
    from torch_fidelity.metric_isc import isc_features_to_metric

    _, fake = features
    ref = isc_features_to_metric(torch.from_numpy(fake["logits"]), splits=10, shuffle=True, rng_seed=2020)
    mean, std = M.inception_score(fake["logits"])
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-12) and std == pytest.approx(ref["inception_score_std"], rel=1e-9)
    assert 1 < mean < 10  # between no and full confidence over 10 classes


def test_kid_matches_torch_fidelity(features):
    from torch_fidelity.metric_kid import kid_features_to_metric

    real, fake = features
    kwargs = dict(kid_subsets=20, kid_subset_size=50, rng_seed=2020, verbose=False, kid_kernel="poly",
                  kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    ref = kid_features_to_metric(torch.from_numpy(fake["pool"]), torch.from_numpy(real["pool"]), **kwargs)
    mean, std = M.kid(fake["pool"], real["pool"], subsets=20, subset_size=50)
    assert mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9)
    assert std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-9)
    with pytest.raises(ValueError, match="subset size"):
        M.kid(fake["pool"][:10], real["pool"], subset_size=50)


def brute_force_precision_recall(gen: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019 written out with full distance matrices."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dist(real, real), axis=1)[:, k]  # k-th nearest other sample (index 0 is itself)
    r_gen = np.sort(dist(gen, gen), axis=1)[:, k]
    precision = np.mean([(dist(gen[i : i + 1], real)[0] <= r_real).any() for i in range(len(gen))])
    recall = np.mean([(dist(real[j : j + 1], gen)[0] <= r_gen).any() for j in range(len(real))])
    return float(precision), float(recall)


@pytest.mark.parametrize("block", [7, 4096])
def test_precision_recall_equals_brute_force_with_ties(block):
    # Integer lattice points: many pairwise distances are exactly equal, and some points repeat, so the
    # "<=" of the definition and the radius of duplicated points both matter.
    rng = np.random.default_rng(0)
    real = rng.integers(0, 4, (60, 3)).astype(np.float64)
    gen = rng.integers(0, 5, (45, 3)).astype(np.float64)
    gen[:5] = real[:5]  # exact copies of real points
    expected = brute_force_precision_recall(gen, real, 3)
    assert M.precision_recall(gen, real, k=3, block=block) == pytest.approx(expected, abs=0)
    # By hand: the real point 3 has radius |3 - 0| = 3 (its 3rd nearest other point is 0), so a generated
    # point at 6 lies exactly on its boundary and counts; 6.5 does not; 60 is outside every ball.
    real_line = np.array([[0.0], [1.0], [2.0], [3.0], [50.0], [51.0], [52.0], [53.0]])
    assert M.precision_recall(np.array([[6.0], [60.0], [61.0], [62.0]]), real_line, k=3)[0] == 0.25
    assert M.precision_recall(np.array([[6.5], [60.0], [61.0], [62.0]]), real_line, k=3)[0] == 0.0


def test_precision_recall_on_real_features_matches_torch_fidelity(features):
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    real, fake = features
    p, r = M.precision_recall(fake["pool"], real["pool"], block=33)
    ref_p, ref_r = calculate_precision_recall_full(torch.from_numpy(fake["pool"]), torch.from_numpy(real["pool"]), 3, 10000)
    assert (p, r) == pytest.approx((ref_p, ref_r), abs=1e-6)  # torch-fidelity averages in float32
    assert (p, r) == pytest.approx(brute_force_precision_recall(fake["pool"], real["pool"], 3), abs=0)
    assert M.f1_score(p, r) == pytest.approx(2 * p * r / (p + r))


def test_evaluate_all_extracts_once_per_set_and_matches_direct_metrics(tmp_path, monkeypatch):
    """`all` through the real pipeline (PNG files -> DataLoader -> network -> cache) with random networks."""
    monkeypatch.setenv("BRICS_CACHE_DIR", str(tmp_path / "cache"))
    names = {"inception": ("2048", "logits_unbiased"), "vgg16": ("fc2", "-"), "clip": ("clip", "-")}
    nets = {name: RandomFeatureNet(seed, *names[name]) for seed, name in enumerate(names)}
    extractors = {name: Extractor(f"random-{name}", names[name], lambda paths, device, net=net: net) for name, net in nets.items()}
    samples = load_samples(make_samples(tmp_path / "samples", photo_crops(40, seed=3, noise=0.05)))
    write_pngs(tmp_path / "real", photo_crops(50, seed=4))
    reference = load_reference(str(tmp_path / "real"))
    result = evaluate(["fid", "clip-fid", "is", "kid", "prc"], samples, reference, device=torch.device("cpu"),
                      extractors=extractors, batch_size=16, reference_is_recorded=False)
    assert {n: net.calls for n, net in nets.items()} == {n: 3 + 4 for n in nets}  # 40 + 50 images in batches of 16
    direct = {}
    for name, net in nets.items():
        direct[name] = [extract(s.files, extractors[name], net, torch.device("cpu"), batch_size=7) for s in (samples, reference)]
    gen, ref = direct["inception"]
    assert result["fid"] == pytest.approx(M.fid(gen["2048"], ref["2048"]), rel=1e-6)
    assert result["clip_fid"] == pytest.approx(M.fid(direct["clip"][0]["clip"], direct["clip"][1]["clip"]), rel=1e-6)
    assert (result["is_mean"], result["is_std"]) == pytest.approx(M.inception_score(gen["logits_unbiased"]), rel=1e-6)
    assert (result["kid_mean"], result["kid_std"]) == pytest.approx(M.kid(gen["2048"], ref["2048"], subset_size=40), rel=1e-6)
    p, r = M.precision_recall(direct["vgg16"][0]["fc2"], direct["vgg16"][1]["fc2"])
    assert (result["precision"], result["recall"], result["f1"]) == pytest.approx((p, r, M.f1_score(p, r)))
    proto = result["protocol"]
    assert proto["n_generated"] == 40 and proto["n_reference"] == 50 and proto["kid"]["subset_size"] == 40
    assert any("paper used 50000" in d for d in proto["departures"])
    assert any("not the training data" in d for d in proto["departures"])
    # A second evaluation reads every feature from the cache: no network runs.
    for net in nets.values():
        net.calls = 0
    again = evaluate(["fid"], samples, reference, device=torch.device("cpu"), extractors=extractors)
    assert again["fid"] == result["fid"] and nets["inception"].calls == 0


def test_too_few_images_is_a_usage_error(tmp_path, monkeypatch):
    from brics_cli.errors import ConfigError

    monkeypatch.setenv("BRICS_CACHE_DIR", str(tmp_path / "cache"))
    net = RandomFeatureNet(0, "2048", "logits_unbiased")
    extractors = {"inception": Extractor("random", ("2048", "logits_unbiased"), lambda paths, device: net)}
    samples = load_samples(make_samples(tmp_path / "samples", photo_crops(5, seed=0)))
    with pytest.raises(ConfigError, match="is needs at least 10 generated images, got 5"):
        evaluate(["is"], samples, None, device=torch.device("cpu"), extractors=extractors)
    assert net.calls == 0  # refused before any feature was computed
