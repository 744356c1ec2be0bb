"""The fast samplers (`dpm-solver++`, `heun`): their published update equations written out by hand in
float64, convergence to the exact probability-flow map of Gaussian data, per-index reproducibility,
and `brics sample --npz`, the ADM / guided-diffusion evaluator's batch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from brics_cli.diffusion.config import DiffusionSampleConfig
from brics_cli.diffusion.samplers import (
    count_nfe,
    ddim,
    dpm_solver_pp,
    heun,
    sample_generator,
    sample_generators,
)
from brics_cli.diffusion.schedules import GAMMA_MIN, CosineSchedule, CosineVariantSchedule, LinearSchedule, Schedule
from brics_cli.models.unet import UNet, UNetConfig
from brics_cli.registry import SAMPLERS
from conftest import TINY_RECIPE

F64 = torch.float64
SHAPE = (2, 4, 4)


class LambdaUniformSchedule(Schedule):
    """lambda = log(alpha / sigma) falling linearly from +L at t = 0 to -L at t = 1: on the uniform t grid every
    step has the same h, the setting in which the solvers' order is stated (Lu et al. 2022 Thm. 3.2; EDM Sec. 3).
    sigma_ve(1) = e^L is finite, so heun runs Algorithm 1 unchanged."""

    def __init__(self, L: float = 4.0) -> None:
        self.L = L
        self.cfg = SimpleNamespace(name="lambda-uniform")

    def _gamma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(2 * self.L * (1 - 2 * t))  # alpha^2 = sigmoid(2 lambda)


# --- Gaussian data: x0 ~ N(mu_c, s_c^2) independently per value, channel c ---------------------------

MU = torch.tensor([0.2, -0.5], dtype=F64).view(2, 1, 1)
S = torch.tensor([0.3, 0.1], dtype=F64).view(2, 1, 1)


def gaussian_eps(x: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2), computed in float64."""
    l = logsnr.double().view(-1, 1, 1, 1)
    a2, s2 = torch.sigmoid(l), torch.sigmoid(-l)  # alpha^2, sigma^2
    return (s2.sqrt() * (x.double() - a2.sqrt() * MU) / (a2 * S**2 + s2)).to(x.dtype)


def initial_noise(seed: int, n: int) -> torch.Tensor:
    """x at t = 1 exactly as the samplers draw it: row i from sample_generator(seed, i)."""
    return torch.stack([torch.randn(SHAPE, generator=sample_generator(seed, i)) for i in range(n)])


def exact_flow_map(schedule: Schedule, x1: torch.Tensor, steps: int) -> torch.Tensor:
    """The probability-flow ODE keeps u = (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) fixed from t = 1 to
    t_1 = 1/steps; the samplers' last step returns E[x0 | x_t1] = mu + alpha_1 s^2 u / sqrt(alpha_1^2 s^2 + sigma_1^2)."""
    g1, g = (schedule.gamma(torch.tensor(t, dtype=F64)) for t in (1.0, 1.0 / steps))
    u = (x1.double() - g1.sqrt() * MU) / (g1 * S**2 + 1 - g1).sqrt()
    return MU + g.sqrt() * S**2 * u / (g * S**2 + 1 - g).sqrt()


def flow_errors(sampler, schedule: Schedule, step_counts: tuple[int, ...], n: int = 16) -> list[float]:
    x1 = initial_noise(3, n)
    errors = []
    for steps in step_counts:
        x = sampler(gaussian_eps, schedule, SHAPE, steps=steps, generators=sample_generators(3, range(n)), clip_x0=False)
        errors.append((x.double() - exact_flow_map(schedule, x1, steps)).abs().max().item())
    return errors


@pytest.mark.parametrize("sampler", [dpm_solver_pp, heun], ids=["dpm-solver++", "heun"])
def test_fast_samplers_converge_to_the_exact_flow_map_at_second_order(sampler, one_thread):
    errors = flow_errors(sampler, LambdaUniformSchedule(), (25, 50, 100, 200))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    print(f"{sampler.__name__}: max error {errors} ratios {ratios}")
    # Observed ratios 3.7-4.2 (dpm-solver++ 5.9e-3 -> 1.0e-4, heun 1.4e-2 -> 2.1e-4). [3.4, 4.6] is an order of
    # 1.75-2.2: a first-order method halves (DDIM: 1.96-1.99 here), and float32 round-off (~1e-6) is far below.
    assert all(3.4 < r < 4.6 for r in ratios), ratios
    assert errors[-1] < 3e-4


def test_on_the_default_schedule_the_fast_samplers_converge_and_beat_ddim(one_thread):
    """cosine-variant on the uniform t grid: sigma^2 ~ 1.2 t near t = 0, so the last steps have h ~ 1/2 log(i/(i-1))
    whatever the step count and no solver keeps its order there (observed ratios 1.1-1.5); they still converge."""
    schedule, counts = CosineVariantSchedule(), (100, 200, 400)
    reference = flow_errors(ddim, schedule, counts)
    for sampler in (dpm_solver_pp, heun):
        errors = flow_errors(sampler, schedule, counts)
        print(f"{sampler.__name__}: {errors} (ddim {reference})")
        assert errors[0] > errors[1] > errors[2] and errors[1] < 4e-3  # observed 3.0e-3 (dpm-solver++), 1.1e-3 (heun)
        assert all(e < r / 5 for e, r in zip(errors, reference))  # ddim: 2.5e-2 .. 1.2e-2


def test_heuns_first_interval_from_the_clipped_t1_is_euler():
    """With gamma(1) at the 1e-9 clip, sigma_ve(1) = 3.2e4 is no real sigma_max: Algorithm 1's trapezoid across
    [sigma_ve_s, 3.2e4] would be far off the exact map, the Euler step is not."""
    schedule, x1 = CosineSchedule(), initial_noise(3, 16)
    assert schedule.gamma(torch.tensor(1.0, dtype=F64)).item() == GAMMA_MIN
    exact = exact_flow_map(schedule, x1, 10)
    ours = heun(gaussian_eps, schedule, SHAPE, steps=10, generators=sample_generators(3, range(16)), clip_x0=False)
    literal = reference_heun(gaussian_eps, schedule, x1, 10, clip_x0=False, euler_first=False)
    ours_error, literal_error = (ours.double() - exact).abs().max().item(), (literal - exact).abs().max().item()
    print(f"heun, 10 steps of cosine: error {ours_error:.3g}; with the trapezoid on the first interval {literal_error:.3g}")
    assert ours_error < 0.05 and literal_error > 1.0  # observed 0.026 and 5.1


# --- the update equations, written out from REFERENCES Sec. 11 in float64 ------------------------------


def wavy_eps(x: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """A nonlinear stand-in for a UNet, in the dtype of x: the Gaussian's eps plus alpha 1.2 tanh(2x), so its x0
    prediction D_gauss - 1.2 sigma tanh(2x) stays O(1) (as a trained model's does) and leaves [-1, 1] at high noise."""
    alpha = torch.sigmoid(logsnr.to(x.dtype)).sqrt().view(-1, 1, 1, 1)
    return gaussian_eps(x, logsnr) + alpha * 1.2 * torch.tanh(2 * x)


def _grid(schedule: Schedule, steps: int):
    """alpha_k, sigma_k, logSNR_k at the sampling times t = 1, (steps-1)/steps, ..., 1/steps (k = 0 first), float64."""
    t = torch.arange(steps, 0, -1, dtype=F64) / steps
    g, logsnr = schedule.gamma(t), schedule.logsnr(t)
    return g.sqrt(), (1 - g).sqrt(), logsnr


def _denoise(model, x, alpha, sigma, logsnr, clip_x0):
    x0 = (x - sigma * model(x, logsnr.expand(x.shape[0]))) / alpha
    return x0.clamp(-1, 1) if clip_x0 else x0


def reference_dpm_solver_pp(model, schedule, x1, steps, clip_x0):
    """Lu et al. 2022 Alg. 2 as REFERENCES writes it: x_1 = (sigma_1/sigma_0) x_0 - alpha_1 (e^-h_1 - 1) D_0, then
    D = (1 + 1/2r) D_{i-1} - 1/2r D_{i-2}, r = h_{i-1}/h_i; the last step returns the x0 prediction."""
    alpha, sigma, logsnr = _grid(schedule, steps)
    lam = torch.log(alpha / sigma)
    x, D_hist = x1.double(), []
    for k in range(steps - 1):
        D_hist.append(_denoise(model, x, alpha[k], sigma[k], logsnr[k], clip_x0))
        h = lam[k + 1] - lam[k]
        if k == 0:
            D = D_hist[0]
        else:
            r = (lam[k] - lam[k - 1]) / h
            D = (1 + 1 / (2 * r)) * D_hist[k] - 1 / (2 * r) * D_hist[k - 1]
        x = sigma[k + 1] / sigma[k] * x - alpha[k + 1] * (torch.exp(-h) - 1) * D
    return _denoise(model, x, alpha[-1], sigma[-1], logsnr[-1], clip_x0)


def reference_heun(model, schedule, x1, steps, clip_x0, euler_first=None):
    """Karras et al. 2022 Alg. 1 on y = x/alpha, s = sigma/alpha: d = (y - D)/s, Euler y' = y + (s' - s) d, then
    y + (s' - s)(d + d')/2 with d' = (y' - D(y'))/s'; the last step (to s = 0) is the Euler step, whose result is D.
    `euler_first`: skip the correction on the first interval (samplers.heun does so at a clipped gamma(1))."""
    alpha, sigma, logsnr = _grid(schedule, steps)
    if euler_first is None:
        euler_first = schedule.gamma(torch.tensor(1.0, dtype=F64)).item() <= GAMMA_MIN
    s = sigma / alpha
    y = x1.double() / alpha[0]
    for k in range(steps - 1):
        D = _denoise(model, alpha[k] * y, alpha[k], sigma[k], logsnr[k], clip_x0)
        d = (y - D) / s[k]
        y_euler = y + (s[k + 1] - s[k]) * d
        if k == 0 and euler_first:
            y = y_euler
            continue
        D_euler = _denoise(model, alpha[k + 1] * y_euler, alpha[k + 1], sigma[k + 1], logsnr[k + 1], clip_x0)
        y = y + (s[k + 1] - s[k]) * 0.5 * (d + (y_euler - D_euler) / s[k + 1])
    return _denoise(model, alpha[-1] * y, alpha[-1], sigma[-1], logsnr[-1], clip_x0)


@pytest.mark.parametrize("schedule", [LambdaUniformSchedule(), CosineVariantSchedule(), LinearSchedule()],
                         ids=["lambda-uniform", "cosine-variant", "linear"])
@pytest.mark.parametrize("clip_x0", [False, True], ids=["raw", "clipped"])
def test_one_and_two_steps_follow_the_published_updates(schedule, clip_x0):
    x1 = initial_noise(11, 6)
    # float32 against float64. Observed <= 2e-5. On cosine-variant <= 1.1e-3: there gamma(1) = 1e-9, and the x0
    # prediction (x - sigma eps) / alpha at t = 1 divides float32 round-off (~6e-8) by alpha = 3.2e-5 -- true of
    # every epsilon sampler (ddim too); with 2-3 steps the next alpha is not small enough to hide it.
    tolerance = 3e-3 if isinstance(schedule, CosineVariantSchedule) else 5e-5
    # steps = 2: one update then the last step's x0 prediction; steps = 3: two updates, the second the
    # multistep (2M) one, and for heun a trapezoid correction on every schedule.
    for steps in (2, 3):
        for sampler, reference in ((dpm_solver_pp, reference_dpm_solver_pp), (heun, reference_heun)):
            ours = sampler(wavy_eps, schedule, SHAPE, steps=steps, generators=sample_generators(11, range(6)), clip_x0=clip_x0)
            expected = reference(wavy_eps, schedule, x1, steps, clip_x0)
            error = ((ours.double() - expected).abs() / (1 + expected.abs())).max().item()
            assert error < tolerance, (sampler.__name__, steps, error)
            # A first-order step in their place (DDIM) is far off: the test sees the second-order terms.
            if steps == 3:
                first_order = ddim(wavy_eps, schedule, SHAPE, steps=3, generators=sample_generators(11, range(6)), clip_x0=clip_x0)
                assert (first_order.double() - expected).abs().max() > 5 * tolerance
    if clip_x0:  # the clamp is active: without it the answer differs
        raw = reference_dpm_solver_pp(wavy_eps, schedule, x1, 3, False)
        assert (raw - reference_dpm_solver_pp(wavy_eps, schedule, x1, 3, True)).abs().max() > 5 * tolerance


def test_heun_counts_two_evaluations_per_interval_but_the_last():
    assert [count_nfe("heun", LambdaUniformSchedule(), n) for n in (1, 2, 10)] == [1, 3, 19]
    assert [count_nfe("heun", CosineVariantSchedule(), n) for n in (1, 2, 10)] == [1, 2, 18]  # first interval: Euler
    assert count_nfe("dpm-solver++", CosineVariantSchedule(), 10) == count_nfe("ddim", CosineVariantSchedule(), 10) == 10


# --- reproducibility and settings ------------------------------------------------------------------------


def test_a_fast_sample_depends_only_on_its_own_generator():
    schedule = CosineVariantSchedule()
    for sampler in (dpm_solver_pp, heun):
        run = lambda seed, idx: sampler(wavy_eps, schedule, SHAPE, steps=12, generators=sample_generators(seed, idx))
        batch16, batch4, middle = run(7, range(16)), run(7, range(4)), run(7, range(8, 12))
        assert torch.equal(batch16[:4], batch4) and torch.equal(batch16[8:12], middle)
        assert not torch.allclose(run(8, range(4)), batch4)


def test_fast_unet_samples_do_not_depend_on_the_batch(one_thread):
    torch.manual_seed(1)
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_head_channels=32)
    net = UNet(cfg, 2, 8).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    for sampler in (dpm_solver_pp, heun):
        run = lambda idx: sampler(net, CosineVariantSchedule(), (2, 8, 8), steps=10, generators=sample_generators(3, idx))
        batch16, batch4, middle = run(range(16)), run(range(4)), run(range(8, 12))
        # As for ddpm/ddim: oneDNN convolutions block differently per batch size, so not bitwise.
        assert (batch16[:4] - batch4).abs().max() < 1e-4 and (batch16[8:12] - middle).abs().max() < 1e-4
        assert (batch16[:4] - batch16[4:8]).abs().max() > 0.1


def test_the_fast_samplers_are_registered_and_take_no_eta():
    assert SAMPLERS.get("dpm-solver++") is dpm_solver_pp and SAMPLERS.get("heun") is heun
    assert {e.distribution for e in SAMPLERS.entries() if e.name in ("dpm-solver++", "heun")} == {"brics"}
    for name in ("dpm-solver++", "heun"):
        DiffusionSampleConfig(sampler=name, steps=20).validate()
        with pytest.raises(ValueError, match="ddim only"):
            DiffusionSampleConfig(sampler=name, eta=0.5).validate()
        with pytest.raises(ValueError, match="ddim sampler only"):
            SAMPLERS.get(name)(wavy_eps, LinearSchedule(), SHAPE, steps=3, generators=sample_generators(0, [0]), eta=0.5)
    DiffusionSampleConfig(sampler="ddim", eta=0.5).validate()


# --- brics sample --npz ----------------------------------------------------------------------------------


def brics(*args, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "brics_cli", *map(str, args)], capture_output=True, text=True)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory, tiny_shards) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    brics("ae-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={root}", "ae.train.steps=4")
    brics("diffusion-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={root}")
    return root / "diffusion"


def test_sample_npz_is_the_evaluators_batch_of_the_pngs(diffusion_run, tmp_path):
    out, npz = tmp_path / "s", tmp_path / "batches" / "s.npz"
    args = ["sample", "--from", diffusion_run, "--num-samples", 5, "--sampler", "dpm-solver++", "--steps", 6, "--batch", 2, "--out", out]
    manifest = json.loads(brics(*args, "--npz", npz, "--json").stdout.splitlines()[-1])
    assert manifest["npz"]["path"] == str(npz) and manifest["npz"]["shape"] == [5, 32, 32, 3]
    assert json.loads((out / "manifest.json").read_text())["npz"] == manifest["npz"]
    with np.load(npz) as batch:  # as the ADM evaluator reads it
        assert batch.files == ["arr_0"]
        arr = batch["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 32, 32, 3)
    for i in range(5):
        assert np.array_equal(arr[i], np.asarray(Image.open(out / f"{i:06d}.png").convert("RGB"))), i
    assert not list(npz.parent.glob(".*tmp*"))
    # The same array np.savez itself would write, and a rerun that finds every image there still writes the batch.
    np.savez(tmp_path / "numpy.npz", arr_0=arr)
    again = brics(*args, "--npz", tmp_path / "again.npz")
    assert "already there" in again.stderr and "arr_0 (5, 32, 32, 3) uint8" in again.stdout
    with np.load(tmp_path / "again.npz") as a, np.load(tmp_path / "numpy.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and a["arr_0"].dtype == b["arr_0"].dtype


def test_sample_with_heun_and_the_eta_rule(diffusion_run, tmp_path):
    common = ["sample", "--from", diffusion_run, "--num-samples", 2, "--steps", 4, "--out", tmp_path / "h"]
    refused = brics(*common, "--sampler", "heun", "--eta", 0.3, check=False)
    assert refused.returncode == 2 and "--eta applies to the ddim sampler only" in refused.stderr
    manifest = json.loads(brics(*common, "--sampler", "heun", "--json").stdout.splitlines()[-1])
    assert manifest["sampler"] == "heun" and manifest["eta"] == 0.0 and "npz" not in manifest
    assert math.isfinite(np.asarray(Image.open(tmp_path / "h" / "000001.png")).mean())


def test_sample_from_the_run_root_the_stage_folder_or_the_checkpoint(diffusion_run, tmp_path):
    """`--from runs/demo` (the recipe's run.dir), `runs/demo/diffusion` and a checkpoint file: one model, one set of images."""
    newest = max((diffusion_run / "checkpoints").glob("*.safetensors"))
    for name, source in (("root", diffusion_run.parent), ("stage", diffusion_run), ("file", newest)):
        brics("sample", "--from", source, "--num-samples", 2, "--steps", 2, "--sampler", "ddim", "--out", tmp_path / name)
        assert json.loads((tmp_path / name / "manifest.json").read_text())["checkpoint"] == str(newest)
    for i in range(2):
        assert len({(tmp_path / name / f"{i:06d}.png").read_bytes() for name in ("root", "stage", "file")}) == 1


def test_sample_output_is_recorded_by_its_run_and_found_by_eval_wherever_it_was_written(diffusion_run, tmp_path):
    root = diffusion_run.parent  # the run root (the recipe's run.dir), standing in for runs/
    common = ["sample", "--from", root, "--num-samples", 2, "--steps", 2, "--sampler", "ddim"]  # the run root is accepted
    brics(*common, "--out", root / "samples-old")
    elsewhere = tmp_path / "elsewhere" / "ddim"
    brics(*common, "--out", elsewhere)
    index = json.loads((diffusion_run / "outputs.json").read_text())["outputs"]
    assert [e["folder"] for e in index if e["kind"] == "samples"][-2:] == [str(root / "samples-old"), str(elsewhere)]
    found = brics("nn-search", "--runs", root, "--metric", "l2", "--limit", 2, "--k", 1, "--out", tmp_path / "nn", "--json")
    assert (f"samples: {elsewhere} (the newest `brics sample` output, recorded in {diffusion_run / 'outputs.json'}"
            in found.stderr), found.stderr
