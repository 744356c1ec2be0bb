"""Training commands check every prerequisite before any work and name all that are missing at once."""

from __future__ import annotations

import json

from conftest import TINY_RECIPE, run_in_process, run_in_process_full
from eval_fixtures import isolate_weights


def test_ae_train_names_the_missing_shards_and_weights_together_and_writes_nothing(tmp_path, monkeypatch, capsys):
    hub = isolate_weights(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["ae-train", TINY_RECIPE, "data.shards=shards/none", "ae.loss.perceptual_type=vgg-l1", "ae.loss.perceptual=1",
            "--out", tmp_path / "run"]
    code, err = run_in_process(list(map(str, argv)), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[0] == "error: ae-train cannot start; 2 prerequisites missing:"
    assert "data.shards: shards/none -- make it with `brics shard SOURCE ... --out shards/none`" in lines[1]
    assert "weight file vgg16-397923af.pth" in lines[2] and f"copy it to {hub}/" in lines[2]
    assert not (tmp_path / "run").exists()

    code, out, _ = run_in_process_full([*argv, "--dry-run", "--json"], capsys)  # the same list, next to the plan
    plan = json.loads(out.splitlines()[-1])
    assert code == 2 and plan["dry_run"] and [m["what"].split(" (")[0] for m in plan["missing"]] == [
        "data.shards: shards/none", "weight file vgg16-397923af.pth"]
    assert plan["perceptual"] == "vgg-l1" and not (tmp_path / "run").exists()


def test_a_run_folder_that_cannot_be_created_is_named_before_any_work(tmp_path, tiny_shards, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_in_process(["ae-train", str(TINY_RECIPE), f"data.shards={tiny_shards}", "--out", str(blocker / "run")], capsys)
    assert code == 2 and f"run folder {blocker / 'run'}: {blocker} is not a writable folder" in err


def test_diffusion_train_names_the_missing_autoencoder_and_shards(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_in_process_full(["diffusion-train", TINY_RECIPE, "data.shards=shards/none", f"run.dir={tmp_path / 'runs'}",
                                  "--dry-run", "--json"], capsys)
    plan = json.loads(out.splitlines()[-1])
    assert code == 2 and plan["ae_checkpoint"] is None
    assert [m["what"] for m in plan["missing"]] == [f"autoencoder checkpoint: no autoencoder run at {tmp_path / 'runs' / 'ae'}",
                                                    "data.shards: shards/none"]
    assert "brics ae-train" in plan["missing"][0]["fix"]


def test_a_complete_setup_plans_with_nothing_missing(tmp_path, tiny_shards, capsys):
    code, out, err = run_in_process_full(["ae-train", TINY_RECIPE, f"data.shards={tiny_shards}", "--out", tmp_path / "r",
                                    "--dry-run", "--json"], capsys)
    assert code in (0, None), err
    assert json.loads(out.splitlines()[-1])["missing"] == []


def test_eval_and_nn_search_name_missing_samples_and_weights_together(tmp_path, monkeypatch, capsys):
    isolate_weights(monkeypatch, tmp_path)
    for argv, command, weight in ((["eval", "clip-fid"], "eval clip-fid", "ViT-B-32.pt"),
                                  (["nn-search"], "nn-search", "alexnet-owt-7be5be79.pth")):
        code, err = run_in_process([*argv, "--runs", str(tmp_path / "runs")], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and lines[0] == f"error: {command} cannot start; 2 prerequisites missing:", err
        assert lines[1].startswith("  - samples -- ") and "pass --samples DIR" in lines[1]
        assert lines[2].startswith(f"  - weight file {weight}")


def test_eval_recon_without_alexnet_says_that_lpips_can_be_left_out(tmp_path, monkeypatch, capsys):
    isolate_weights(monkeypatch, tmp_path)
    code, err = run_in_process(["eval", "recon", "--samples", str(tmp_path)], capsys)
    assert code == 2 and "alexnet-owt-7be5be79.pth" in err and err.strip().endswith("or pass --lpips-net none for PSNR and SSIM only")
