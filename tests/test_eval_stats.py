"""Reference statistics (`brics eval stats`, `--ref-stats`), seed sets (`--seed-sets K`) and the shared
feature cache under parallel runs.

The production networks run with fixed random weights saved under the published file names (torch-fidelity's
Inception, torchvision's VGG16, a one-layer CLIP), so the production loading and extraction code runs unchanged;
DINOv2 is absent here, which exercises the "skipped, with a note" path (tests/test_eval_dinov2.py covers it).
"""

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from brics_cli.eval import metrics as M
from brics_cli.eval.features import Extractor
from brics_cli.eval.generative import evaluate
from brics_cli.eval.image_sets import load_reference, load_samples
from eval_fixtures import make_samples, private_weights_environment, save_fake_fidelity_inception, save_fake_torchvision, write_pngs
from test_eval_cli import demo_shards, noisy_copies
from test_eval_metrics import RandomFeatureNet, photo_crops
from test_shard import run_cli


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    hub = root / "torch" / "hub" / "checkpoints"
    save_fake_fidelity_inception(hub / "weights-inception-2015-12-05-6726825d.pth")
    save_fake_torchvision("vgg16", hub / "vgg16-397923af.pth")
    from brics_cli.eval.features import cleanfid_clip_module

    cleanfid_clip_module()  # imports `clip` even where setuptools no longer has pkg_resources
    import clip

    torch.manual_seed(0)  # embed_dim 4 < the number of images: full-rank covariances for clean-fid's scipy sqrtm
    tiny_clip = clip.model.CLIP(embed_dim=4, image_resolution=224, vision_layers=1, vision_width=64, vision_patch_size=32,
                                context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    (root / "home" / ".cache" / "clip").mkdir(parents=True)
    torch.save(tiny_clip.state_dict(), root / "home" / ".cache" / "clip" / "ViT-B-32.pt")
    shards = demo_shards(root / "shards", train=8)
    with private_weights_environment(root):
        reference = load_reference(str(shards))
        samples = make_samples(root / "samples", noisy_copies(reference.path, 8, seed=0), data=str(shards))
        yield {"root": root, "shards": shards, "samples": samples, "reference": reference}


def cli_json(monkeypatch, capsys, *args):
    code, out, err = run_cli(monkeypatch, capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def test_metrics_from_ref_stats_equal_metrics_from_the_reference_images(monkeypatch, capsys, world):
    stats_file = world["root"] / "church-stats.npz"
    made, err = cli_json(monkeypatch, capsys, "eval", "stats", "--ref", world["shards"], "--out", stats_file)
    prov = made["provenance"]
    assert set(prov["networks"]) == {"inception", "clip", "vgg16"} and "dinov2_vitl14_pretrain.pth" in prov["skipped"]["dinov2"]
    assert "note: dinov2 statistics skipped" in err
    ref = prov["reference"]
    assert ref["kind"] == "shards" and ref["manifest_sha256"] == world["reference"].manifest_sha256 and ref["n_images"] == 8
    assert ref["split"] == "train" and prov["libraries"]["torch-fidelity"] and prov["format"] == "brics-ref-stats/1"
    inception = prov["networks"]["inception"]
    assert inception["weights"][0]["file"] == "weights-inception-2015-12-05-6726825d.pth" and len(inception["weights"][0]["sha256"]) == 64
    assert "299" in inception["resize"] and made["arrays"]["vgg16/fc2/features"] == [8, 4096]
    with np.load(stats_file) as data:  # plain arrays, no pickle
        assert data["inception/2048/sigma"].shape == (2048, 2048) and data["vgg16/fc2/radii"].shape == (8,)
        assert json.loads(str(data["provenance"]))["reference"]["fingerprint"] == world["reference"].fingerprint

    seen = {}
    for metric, keys in (("fid", ["fid"]), ("clip-fid", ["clip_fid"]), ("kid", ["kid_mean", "kid_std"]),
                         ("prc", ["precision", "recall", "f1"])):
        images, _ = cli_json(monkeypatch, capsys, "eval", metric, "--samples", world["samples"], "--ref", world["shards"])
        stats, _ = cli_json(monkeypatch, capsys, "eval", metric, "--samples", world["samples"], "--ref-stats", stats_file)
        for key in keys:
            assert stats[key] == pytest.approx(images[key], rel=1e-9, abs=1e-12), (metric, key)
            seen[key] = images[key]
        proto = stats["protocol"]
        assert proto["reference"]["kind"] == "stats" and proto["reference"]["path"] == str(stats_file)
        assert proto["reference"]["made_from"]["manifest_sha256"] == world["reference"].manifest_sha256
        assert proto["reference"]["recorded_for_samples"] and proto["n_reference"] == 8  # the shards recorded for the samples
    assert seen["fid"] > 0 and seen["clip_fid"] > 0 and 0 < seen["recall"] <= 1  # numbers that could have differed

    code, _, err = run_cli(monkeypatch, capsys, "eval", "fid", "--samples", world["samples"], "--ref", world["shards"],
                           "--ref-stats", stats_file)
    assert code == 2 and "alternatives" in err
    small = world["root"] / "moments.npz"
    cli_json(monkeypatch, capsys, "eval", "stats", "--ref", world["shards"], "--out", small, "--networks", "inception", "--moments-only")
    code, _, err = run_cli(monkeypatch, capsys, "eval", "kid", "--samples", world["samples"], "--ref-stats", small)
    assert code == 2 and "holds no inception features" in err and "--moments-only" in err
    code, _, err = run_cli(monkeypatch, capsys, "eval", "clip-fid", "--samples", world["samples"], "--ref-stats", small)
    assert code == 2 and "holds no clip moments" in err


def test_cleanfid_reads_the_custom_clip_statistics(monkeypatch, capsys, world):
    """clean-fid's own `fid_folder(..., dataset_split="custom")` on the file written for it equals brics' CLIP-FID."""
    import cleanfid
    from cleanfid import fid as cleanfid_fid

    from brics_cli.eval.features import cleanfid_clip_module

    out = world["root"] / "cf" / "MyChurch.npz"
    made, _ = cli_json(monkeypatch, capsys, "eval", "stats", "--ref", world["shards"], "--out", out, "--networks", "clip")
    folder = Path(made["cleanfid"])
    assert sorted(p.name for p in folder.iterdir()) == ["mychurch_clean_clip_vit_b_32_custom_na.npz",
                                                        "mychurch_clean_clip_vit_b_32_custom_na_kid.npz"]
    package = world["root"] / "cleanfid-package"  # clean-fid reads custom statistics from <its package>/stats/
    package.mkdir()
    os.symlink(folder, package / "stats")
    monkeypatch.setattr(cleanfid, "__file__", str(package / "__init__.py"))
    clip_features = cleanfid_clip_module()
    model = clip_features.CLIP_fx(str(world["root"] / "home" / ".cache" / "clip" / "ViT-B-32.pt"), device="cpu")
    theirs = cleanfid_fid.fid_folder(str(world["samples"]), "mychurch", "na", "custom", model=model, mode="clean",
                                     model_name="clip_vit_b_32", num_workers=0, batch_size=4, device=torch.device("cpu"),
                                     verbose=False, custom_fn_resize=clip_features.img_preprocess_clip)
    ours, _ = cli_json(monkeypatch, capsys, "eval", "clip-fid", "--samples", world["samples"], "--ref", world["shards"])
    assert ours["clip_fid"] == pytest.approx(theirs, rel=1e-4)


def test_seed_sets_report_mean_std_min_of_each_set_measured_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("BRICS_CACHE_DIR", str(tmp_path / "cache"))
    names = {"inception": ("2048", "logits_unbiased"), "vgg16": ("fc2", "-")}
    nets = {name: RandomFeatureNet(seed, *names[name]) for seed, name in enumerate(names)}
    extractors = {name: Extractor(f"random-{name}", names[name], lambda paths, device, net=net: net) for name, net in nets.items()}
    images = photo_crops(32, seed=3, noise=0.05)  # 3 sets of 10 (IS needs 10 per set); the last 2 are left out
    samples = load_samples(make_samples(tmp_path / "samples", images))
    write_pngs(tmp_path / "real", photo_crops(40, seed=4))
    reference = load_reference(str(tmp_path / "real"))
    metrics = ["fid", "is", "kid", "prc"]
    cpu = torch.device("cpu")
    result = evaluate(metrics, samples, reference, device=cpu, extractors=extractors, batch_size=8, seed_sets=3)
    sets = result["seed_sets"]
    assert sets["k"] == 3 and sets["set_size"] == 10 and sets["left_out"] == 2 and sets["sets"] == [[0, 10], [10, 20], [20, 30]]
    alone = []
    for j in range(3):  # each set as a samples folder of its own, measured without --seed-sets
        part = load_samples(make_samples(tmp_path / f"set{j}", images[10 * j : 10 * (j + 1)]))
        alone.append(evaluate(metrics, part, reference, device=cpu, extractors=extractors, batch_size=8))
    for key in ("fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall", "f1"):
        values = [r[key] for r in alone]
        assert sets["per_set"][key] == pytest.approx(values, rel=1e-6), key
        assert sets["mean"][key] == pytest.approx(np.mean(values), rel=1e-6) and result[key] == sets["mean"][key]
        assert sets["std"][key] == pytest.approx(np.std(values, ddof=1), rel=1e-5, abs=1e-12)
        assert sets["min"][key] == pytest.approx(min(values), rel=1e-6) and sets["max"][key] == pytest.approx(max(values), rel=1e-6)
    assert len(set(sets["per_set"]["fid"])) == 3  # the sets differ: the split is real
    proto = result["protocol"]
    assert proto["seed_sets"]["set_size"] == 10 and any("10 generated images per seed set" in d for d in proto["departures"])

    from brics_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 2 images each"):
        evaluate(["fid"], samples, reference, device=cpu, extractors=extractors, seed_sets=17)
    with pytest.raises(ConfigError, match="is needs at least 10 generated images per seed set, got 8"):
        evaluate(["is"], samples, None, device=cpu, extractors=extractors, seed_sets=4)


def test_seed_sets_on_the_command_line(monkeypatch, capsys, world):
    result, _ = cli_json(monkeypatch, capsys, "eval", "fid", "--samples", world["samples"], "--ref", world["shards"], "--seed-sets", "2")
    assert len(result["seed_sets"]["per_set"]["fid"]) == 2 and result["fid"] == result["seed_sets"]["mean"]["fid"]
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli(monkeypatch, capsys, "eval", "fid", "--samples", world["samples"], "--ref", world["shards"], "--seed-sets", "2")
    per_set = result["seed_sets"]["per_set"]["fid"]
    assert code == 0 and "2 seed sets of 4 generated images" in out and f"{per_set[0]:.4g} {per_set[1]:.4g}" in out
    code, _, err = run_cli(monkeypatch, capsys, "eval", "fid", "--samples", world["samples"], "--ref", world["shards"], "--seed-sets", "5")
    assert code == 2 and "--seed-sets 5" in err and err.count("\n") == 1


def slow_network(x: torch.Tensor) -> dict:
    time.sleep(0.4)  # a batch takes long enough that the two processes overlap
    return {"colour": x.float().mean((2, 3))}


def fill_cache(cache_dir: str, files: list, barrier, results) -> None:
    """One process of the race: asks for features the other is asking for at the same moment."""
    from brics_cli.eval.features import Extractor, cached_features

    extractor = Extractor("slow mean colour", ("colour",), lambda paths, device: slow_network)
    built = []
    barrier.wait()
    feats, hit = cached_features([Path(f) for f in files], "same-set", Path(cache_dir), extractor,
                                 lambda: built.append(1) or slow_network, device=torch.device("cpu"), batch_size=2)
    results.put((os.getpid(), hit, len(built), feats["colour"].tolist()))


def test_two_processes_filling_one_cache_leave_one_valid_file_and_agree(tmp_path):
    files = [str(p) for p in write_pngs(tmp_path / "images", photo_crops(6, seed=5))]
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=fill_cache, args=(str(cache), files, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    hits = sorted((hit, built) for _, hit, built, _ in got)
    assert hits == [(False, 1), (True, 0)]  # one filled it; the other waited for the lock, then read the file
    assert got[0][3] == got[1][3]
    cached = sorted(cache.glob("features-*.npz"))
    assert [p.name for p in cache.iterdir()] == [cached[0].name] and len(cached) == 1  # no temporaries, no lock in it
    with np.load(cached[0]) as data:
        assert np.array_equal(data["colour"], np.array(got[0][3], dtype=np.float32))
    expected = [np.asarray(__import__("PIL.Image").Image.open(f).convert("RGB"), dtype=np.float32).mean((0, 1)) for f in files]
    assert np.allclose(got[0][3], expected, rtol=1e-5)


def export_reference(cache_dir: str, shards: str, barrier, results) -> None:
    os.environ["BRICS_CACHE_DIR"] = cache_dir
    from brics_cli.eval.image_sets import load_reference

    barrier.wait()
    reference = load_reference(shards)
    results.put([str(f) for f in reference.files if f.is_file()])


def test_two_processes_exporting_one_reference_both_see_every_image(tmp_path, world):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (str(tmp_path / "cache"), str(world["shards"]), barrier, results)
    procs = [ctx.Process(target=export_reference, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert len(got[0]) == 8 and got[0] == got[1]
    exported = [p for p in (tmp_path / "cache" / "reference").iterdir() if p.is_dir()]
    assert len(exported) == 1 and not any(".tmp" in p.name for p in exported)
