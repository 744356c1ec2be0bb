"""`brics eval`, `brics weights` and `brics nn-search` end to end on real shards and sample folders built here.

The pretrained networks are replaced by weight files of the real architectures with fixed random weights,
saved under the published names (BRICS_ALLOW_UNVERIFIED_WEIGHTS=1), so the production loading and
feature-extraction code runs unchanged; nothing is mocked.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from brics_cli.data.shards import ShardOptions, write_shards
from brics_cli.data.sources.demo import list_demo, process_demo
from brics_cli.eval import metrics as M
from eval_fixtures import make_samples, offline_env, private_weights_environment, save_fake_fidelity_inception, save_fake_torchvision, write_pngs
from test_shard import run_cli

ROOT = Path(__file__).resolve().parents[1]


def demo_shards(out: Path, train: int, resolution: int = 32) -> Path:
    options = ShardOptions(resolution=resolution, shard_size=16, small="upscale", extra=(("train_count", train),))
    write_shards(out, list_demo(train, 4), process_demo, options, {"type": "demo"})
    return out


def noisy_copies(folder: Path, n: int, seed: int) -> np.ndarray:
    """n images: reference images plus noise (plausible 'samples' of the same size)."""
    rng = np.random.default_rng(seed)
    files = sorted(folder.glob("*.png"))
    from PIL import Image

    base = np.stack([np.asarray(Image.open(files[i % len(files)]).convert("RGB")) for i in range(n)]).astype(np.float64)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards (exported once), samples, and fake weight files, in a private environment for the whole module."""
    root = tmp_path_factory.mktemp("eval")
    hub = root / "torch" / "hub" / "checkpoints"
    save_fake_fidelity_inception(hub / "weights-inception-2015-12-05-6726825d.pth")
    save_fake_torchvision("alexnet", hub / "alexnet-owt-7be5be79.pth")
    shards = demo_shards(root / "shards", train=6)
    with private_weights_environment(root):
        from brics_cli.eval.image_sets import export_shards

        reference = export_shards(shards, "train")
        samples = make_samples(root / "samples", noisy_copies(reference.path, 10, seed=0), data=str(shards))
        yield {"root": root, "shards": shards, "samples": samples, "reference": reference, "hub": hub}


def cli_json(monkeypatch, capsys, *args):
    code, out, err = run_cli(monkeypatch, capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def test_eval_without_weights_stops_at_once_offline(tmp_path, world):
    """No weight files, no network: exit 1 within seconds, one line naming the file and its folder, no work done."""
    env = offline_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"], env=env, capture_output=True, text=True)
    assert "network access blocked" in probe.stderr  # the sitecustomize is active

    def brics(*args):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "brics_cli", *args], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        return proc, time.perf_counter() - start

    proc, seconds = brics("eval", "fid", "--samples", str(world["samples"]), "--ref", str(world["shards"]))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    assert proc.returncode == 2 and seconds < 30  # a missing prerequisite
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: missing pretrained weight file 'weights-inception-2015-12-05-6726825d.pth'")
    assert f"{hub}/" in proc.stderr
    assert not (tmp_path / "cache").exists()  # stopped before exporting the reference

    proc, _ = brics("eval", "all", "--samples", str(world["samples"]), "--ref", str(world["shards"]))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    for name in ("weights-inception-2015-12-05-6726825d.pth", "vgg16-397923af.pth", "ViT-B-32.pt", str(tmp_path / "home" / ".cache" / "clip")):
        assert name in proc.stderr

    proc, _ = brics("nn-search", "--samples", str(world["samples"]), "--ref", str(world["shards"]))
    assert proc.returncode == 2 and "alexnet-owt-7be5be79.pth" in proc.stderr and proc.stderr.count("\n") == 1

    proc, _ = brics("weights", "fetch", "vgg16")  # tries the network, which is blocked: one line, exit 1
    assert proc.returncode == 1 and proc.stderr.startswith("error: could not download") and proc.stderr.count("\n") == 1
    assert list(hub.iterdir()) == []  # no partial download left behind


def test_eval_fid_kid_is_agree_with_torch_fidelity(monkeypatch, capsys, world):
    """The whole path (files -> features -> metrics) against torch-fidelity's own folder pipeline, same weights."""
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

    samples, reference = world["samples"], world["reference"]
    results = {}
    for metric in ("fid", "kid", "is"):  # kid and is reuse the features cached by fid
        results[metric], err = cli_json(monkeypatch, capsys, "eval", metric, "--samples", samples, "--ref", world["shards"], "--batch", "8")
        assert json.loads((samples / f"eval-{metric}.json").read_text()) == results[metric]
    kwargs = dict(cuda=False, verbose=False, batch_size=8, input1=str(samples), input2=str(reference.path), kid_subset_size=6,
                  save_cpu_ram=True)  # save_cpu_ram: no DataLoader worker processes
    extractor = create_feature_extractor(
        "inception-v3-compat", ["2048", "logits_unbiased"], cuda=False,
        feature_extractor_weights_path=str(world["hub"] / "weights-inception-2015-12-05-6726825d.pth"),
    )
    theirs = [extract_featuresdict_from_input_id(i, extractor, **kwargs) for i in (1, 2)]
    assert results["fid"]["fid"] == pytest.approx(M.fid(theirs[0]["2048"], theirs[1]["2048"]), rel=1e-5)
    kid = kid_featuresdict_to_metric(*theirs, "2048", **kwargs)
    # torch-fidelity evaluates the KID kernels in float32 (its features' dtype), brics in float64.
    assert results["kid"]["kid_mean"] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-3)
    assert results["kid"]["kid_std"] == pytest.approx(kid["kernel_inception_distance_std"], rel=1e-3)
    isc = isc_featuresdict_to_metric(theirs[0], "logits_unbiased", **kwargs)
    assert results["is"]["is_mean"] == pytest.approx(isc["inception_score_mean"], rel=1e-5)
    assert results["is"]["is_std"] == pytest.approx(isc["inception_score_std"], rel=1e-4, abs=1e-7)
    proto = results["fid"]["protocol"]
    assert proto["n_generated"] == 10 and proto["n_reference"] == 6
    assert proto["reference"]["manifest_sha256"] == reference.manifest_sha256 and proto["reference"]["recorded_for_samples"]
    assert proto["weights"][0]["file"] == "weights-inception-2015-12-05-6726825d.pth" and len(proto["weights"][0]["sha256"]) == 64
    assert proto["libraries"]["torch-fidelity"] and proto["device"] == "cpu" and "299" in next(iter(proto["resize"].values()))
    assert any("paper used 50000" in d for d in proto["departures"])
    assert "kid_mean" not in results["fid"] and results["is"]["protocol"]["n_reference"] is None


def test_eval_defaults_pick_the_newest_samples_and_their_training_data(monkeypatch, capsys, tmp_path, world):
    monkeypatch.chdir(tmp_path)
    images = noisy_copies(world["reference"].path, 3, seed=1)
    old = make_samples(tmp_path / "runs" / "old" / "samples", images)
    time.sleep(0.01)
    run = tmp_path / "runs" / "new" / "diffusion"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"data:\n  shards: {world['shards']}\n  resolution: 32\n")
    new = make_samples(tmp_path / "runs" / "new" / "samples", images, run=str(run))
    os.utime(old / "manifest.json", (1, 1))
    result, err = cli_json(monkeypatch, capsys, "eval", "fid", "--batch", "8")
    assert "samples: runs/new/samples (the newest `brics sample` output, found under runs/" in err
    assert "training data recorded for the samples" in err
    assert result["protocol"]["samples"]["path"] == "runs/new/samples" and result["protocol"]["reference"]["recorded_for_samples"]
    assert (new / "eval-fid.json").is_file()
    export = Path(result["protocol"]["reference"]["path"]) / "export.json"
    stamp = export.stat().st_mtime_ns
    # Another reference: said in a warning and in the protocol; the shards' export is reused, not redone.
    write_pngs(tmp_path / "other", images)
    other, err = cli_json(monkeypatch, capsys, "eval", "fid", "--ref", tmp_path / "other")
    assert "warning: protocol differs from the paper's: the reference is not the training data" in err
    assert other["protocol"]["reference"]["recorded_for_samples"] is False
    again, _ = cli_json(monkeypatch, capsys, "eval", "fid")
    assert again["fid"] == result["fid"] and export.stat().st_mtime_ns == stamp
    # Samples without recorded data and no --ref: a usage error naming the fix.
    code, _, err = run_cli(monkeypatch, capsys, "eval", "fid", "--samples", old)
    assert code == 2 and "pass --ref" in err


def test_eval_takes_the_samples_a_run_recorded_outside_runs(monkeypatch, capsys, tmp_path, world):
    """`brics sample --out elsewhere/ddim` notes the folder in its run's outputs.json (tests/test_samplers_fast.py
    checks that on a real run): `brics eval` then takes it over an older runs/demo/samples and says why."""
    from brics_cli.runs import record_output

    monkeypatch.chdir(tmp_path)
    images = noisy_copies(world["reference"].path, 3, seed=1)
    run = tmp_path / "runs" / "demo" / "diffusion"
    old = make_samples(tmp_path / "runs" / "demo" / "samples", images, run=str(run), data=str(world["shards"]))
    os.utime(old / "manifest.json", (1, 1))
    elsewhere = make_samples(tmp_path / "elsewhere" / "ddim", images, run=str(run), data=str(world["shards"]))
    record_output(run / "checkpoints" / "step-000001.safetensors", "samples", elsewhere)
    result, err = cli_json(monkeypatch, capsys, "eval", "fid", "--batch", "8")
    assert (f"samples: {elsewhere} (the newest `brics sample` output, recorded in runs/demo/diffusion/outputs.json; "
            "--samples DIR to choose)") in err
    assert (elsewhere / "eval-fid.json").is_file() and not (old / "eval-fid.json").exists()
    # Once the older folder is written again it is the newer one: the scan under runs/ finds it.
    os.utime(elsewhere / "manifest.json", (2, 2))
    os.utime(old / "manifest.json")
    _, err = cli_json(monkeypatch, capsys, "eval", "fid", "--batch", "8")
    assert "samples: runs/demo/samples (the newest `brics sample` output, found under runs/" in err


def test_eval_recon_reports_table2_numbers(monkeypatch, capsys, tmp_path, world):
    from brics_cli.nets.perceptual import load_lpips
    from brics_cli.core.images import load_image
    from brics_cli.eval.recon_metrics import psnr, ssim, summarise

    folder = tmp_path / "runs" / "demo" / "recon-val"
    originals = noisy_copies(world["reference"].path, 6, seed=2)
    write_pngs(folder / "inputs", originals)
    write_pngs(folder / "recon", noisy_copies(folder / "inputs", 6, seed=3))
    result, _ = cli_json(monkeypatch, capsys, "eval", "recon", "--samples", folder, "--batch", "4")
    x = torch.stack([load_image(p) for p in sorted((folder / "inputs").glob("*.png"))])
    y = torch.stack([load_image(p) for p in sorted((folder / "recon").glob("*.png"))])
    assert result["n"] == 6 and "lpips_unavailable" not in result
    assert result["psnr"] == pytest.approx(summarise(psnr(y, x)))
    assert result["ssim"] == pytest.approx(summarise(ssim(y, x)))
    with torch.no_grad():
        assert result["lpips"] == pytest.approx(summarise(load_lpips("alex")(y, x).flatten()), rel=1e-5)
    assert json.loads((folder / "eval-recon.json").read_text())["protocol"]["lpips"] == "lpips v0.1 alex"
    monkeypatch.chdir(tmp_path)  # without --samples: the newest reconstruction folder under ./recon or ./runs
    none, err = cli_json(monkeypatch, capsys, "eval", "recon", "--lpips-net", "none")
    assert "reconstructions: runs/demo/recon-val (the newest `brics reconstruct` output, found under runs/" in err
    assert none["lpips"] is None and none["lpips_unavailable"] and none["psnr"] == result["psnr"]
    (folder / "recon" / "000005.png").unlink()
    code, _, err = run_cli(monkeypatch, capsys, "eval", "recon", "--samples", folder)
    assert code == 1 and "differ in 1 file names (first: 000005.png)" in err


def test_weights_status_and_path(monkeypatch, capsys, world):
    report, _ = cli_json(monkeypatch, capsys, "weights", "status")
    rows = {r["name"]: r for r in report["weights"]}
    assert rows["alexnet"]["present"] and rows["alexnet"]["sha256_ok"] is False  # a fake, correctly named
    assert rows["vgg16"]["present"] is False and rows["vgg16"]["expected_dir"] == str(world["hub"])
    assert rows["lpips-lin-alex"]["sha256_ok"] is True
    paths, _ = cli_json(monkeypatch, capsys, "weights", "path")
    assert paths["vgg16"] == {"path": str(world["hub"] / "vgg16-397923af.pth"), "present": False}
    code, out, _ = run_cli(monkeypatch, capsys, "weights", "path", "clip-vit-b-32")
    assert code == 0 and out.strip() == str(Path(os.environ["HOME"]) / ".cache" / "clip" / "ViT-B-32.pt")
    code, out, _ = run_cli(monkeypatch, capsys, "weights", "status")
    assert code == 0 and "missing" in out and "checksum" in out


def brute_force_l2(queries: torch.Tensor, reference: torch.Tensor, k: int):
    d = ((queries[:, None].double() - reference[None].double()) ** 2).flatten(2).mean(2)  # (Q, R) over all pairs
    return d.sort(1)


def test_nn_search_exact_equals_brute_force_and_two_stage_certifies(monkeypatch, capsys, tmp_path, world):
    from brics_cli.core.images import load_image

    shards = demo_shards(tmp_path / "shards", train=96)
    samples = make_samples(tmp_path / "samples", noisy_copies(world["reference"].path, 5, seed=4), data=str(shards))
    exact, _ = cli_json(monkeypatch, capsys, "nn-search", "--samples", samples, "--metric", "l2", "--exact", "--k", "4", "--out", tmp_path / "exact")
    nn = json.loads((tmp_path / "exact" / "nn.json").read_text())
    assert nn["metric"] == "l2" and nn["k"] == 4 and len(nn["queries"]) == 5
    ref_files = sorted(Path(nn["search"]["reference"]["path"]).glob("*.png"))
    q = torch.stack([load_image(samples / f"{i:06d}.png") for i in range(5)])
    r = torch.stack([load_image(p) for p in ref_files])
    values, order = brute_force_l2(q, r, 4)
    for i, query in enumerate(nn["queries"]):
        assert [n["key"] for n in query["neighbours"]] == [ref_files[j].stem for j in order[i, :4].tolist()]
        assert [n["distance"] for n in query["neighbours"]] == pytest.approx(values[i, :4].tolist(), rel=1e-9)
    assert exact["exact_distances"] == 5 * 96 == exact["brute_force_distances"]
    # Two-stage: every certified query has the brute-force neighbours, with far fewer exact distances.
    two, _ = cli_json(monkeypatch, capsys, "nn-search", "--samples", samples, "--metric", "l2", "--k", "4", "--candidates", "24", "--out", tmp_path / "two")
    nn2 = json.loads((tmp_path / "two" / "nn.json").read_text())
    assert two["exact_distances"] == 5 * 24
    for a, b in zip(nn["queries"], nn2["queries"]):
        if b["certified"]:
            assert [n["key"] for n in a["neighbours"]] == [n["key"] for n in b["neighbours"]]
    assert two["certified"] >= 1
    from PIL import Image

    grid = Image.open(tmp_path / "two" / "nn-grid.png")
    assert grid.size == (5 * 32 + 4 * 2, 5 * 32 + 4 * 2)  # 5 rows: a sample, then its 4 neighbours


def test_nn_search_lpips_matches_lpips_package(monkeypatch, capsys, tmp_path, world):
    from brics_cli.eval.nn_search import ImageBank, LPIPSDistance, search
    from brics_cli.nets.perceptual import load_lpips

    model = load_lpips("alex")
    bank = ImageBank(world["reference"].files)
    queries = ImageBank(sorted(world["samples"].glob("0*.png"))[:3]).get(range(3))
    with torch.no_grad():
        d = torch.stack([model(queries[i : i + 1].expand(len(bank), -1, -1, -1), bank.get(range(len(bank)))).flatten() for i in range(3)])
    values, order = d.double().sort(1)
    metric = LPIPSDistance(model)
    exact = search(queries, bank, metric, k=3, exact=True)
    assert exact.indices.tolist() == order[:, :3].tolist()
    assert exact.distances.numpy() == pytest.approx(values[:, :3].numpy(), rel=1e-4)
    # The embedding distance is a lower bound of LPIPS for every pair: what makes "certified" sound.
    emb_q = metric.embed(metric.features(queries)).double()
    emb_r = metric.embed(metric.features(bank.get(range(len(bank))))).double()
    assert (((emb_q[:, None] - emb_r[None]) ** 2).sum(-1) <= d.double() + 1e-6).all()
    two_stage = search(queries, bank, metric, k=3, candidates=4)
    for i, certified in enumerate(two_stage.certified):
        if certified:
            assert two_stage.indices[i].tolist() == order[i, :3].tolist()
    result, _ = cli_json(monkeypatch, capsys, "nn-search", "--samples", world["samples"], "--limit", "3", "--k", "3", "--exact", "--out", tmp_path / "nn")
    nn = json.loads((tmp_path / "nn" / "nn.json").read_text())
    assert nn["metric"] == "lpips" and [q["neighbours"][0]["key"] for q in nn["queries"]] == [bank.files[j].stem for j in order[:, 0].tolist()]


def test_production_vgg16_and_clip_extractors_match_the_libraries(monkeypatch, tmp_path, world):
    """The prc and clip-fid feature paths, with random weights in correctly named files: VGG16 fc2 as
    torch-fidelity computes it (before the ReLU), CLIP as clean-fid's own folder pipeline computes it."""
    from cleanfid.fid import get_files_features
    from PIL import Image
    from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16

    from brics_cli.eval.features import cleanfid_clip_module, extract, pil_to_uint8, production_extractors

    clip_features = cleanfid_clip_module()  # imports `clip` even where setuptools no longer has pkg_resources
    import clip

    monkeypatch.setenv("BRICS_WEIGHTS_DIR", str(tmp_path))
    save_fake_torchvision("vgg16", tmp_path / "vgg16-397923af.pth")
    torch.manual_seed(0)
    tiny_clip = clip.model.CLIP(embed_dim=32, image_resolution=224, vision_layers=1, vision_width=64, vision_patch_size=32,
                                context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    torch.save(tiny_clip.state_dict(), tmp_path / "ViT-B-32.pt")
    files = world["reference"].files[:2]
    cpu = torch.device("cpu")
    extractors = production_extractors()

    vgg = extractors["vgg16"]
    ours = extract(files, vgg, vgg.load(cpu), cpu)["fc2"]
    reference = FeatureExtractorVGG16("vgg16", ["fc2"], feature_extractor_weights_path=str(tmp_path / "vgg16-397923af.pth"))
    with torch.no_grad():
        theirs = reference(torch.stack([pil_to_uint8(Image.open(f)) for f in files]))[0].numpy()
    assert ours.shape == (2, 4096) and np.allclose(ours, theirs, rtol=1e-4, atol=1e-5) and (ours < 0).any()

    clip_extractor = extractors["clip"]
    ours = extract(files, clip_extractor, clip_extractor.load(cpu), cpu, batch_size=2)["clip"]
    model = clip_features.CLIP_fx(str(tmp_path / "ViT-B-32.pt"), device="cpu")
    theirs = get_files_features([str(f) for f in files], model, num_workers=0, batch_size=2, device=cpu, mode="clean",
                                custom_fn_resize=clip_features.img_preprocess_clip, verbose=False)
    assert ours.shape == (2, 32) and np.allclose(ours, theirs, rtol=1e-4, atol=1e-5)
