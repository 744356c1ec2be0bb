"""Exit codes as the README says -- 0 ok, 2 usage / config / missing prerequisite, 1 runtime failure --
for every command's "nothing found", "missing weights" and "bad flag" cases, each in one line."""

from __future__ import annotations

import pytest

from conftest import run_in_process
from eval_fixtures import isolate_weights

NOTHING_FOUND = {  # run in an empty folder: no runs, no samples, no shards
    "ae-train": ["ae-train", "demo"],
    "diffusion-train": ["diffusion-train", "demo"],
    "reconstruct": ["reconstruct", "--input", "nowhere", "--out", "o"],
    "sample": ["sample", "--num-samples", "2", "--out", "o"],
    "eval fid": ["eval", "fid"],
    "eval recon": ["eval", "recon", "--lpips-net", "none"],
    "nn-search": ["nn-search", "--metric", "l2"],
    "shard folder": ["shard", "folder", "nowhere", "--out", "o"],
    "info": ["info", "nowhere.yaml"],
}
MISSING_WEIGHTS = {  # everything else there (or not looked at first): the weights are the problem
    "ae-train": ["ae-train", "demo", "ae.loss.perceptual_type=vgg-l1", "ae.loss.perceptual=1"],
    "eval is": ["eval", "is", "--samples", "."],
    "eval recon": ["eval", "recon", "--samples", "."],
    "nn-search": ["nn-search", "--samples", "."],
}
BAD_FLAG = {
    "sample": ["sample", "--num-samples", "0", "--out", "o", "--from", "nowhere"],
    "eval": ["eval", "fidd"],
    "nn-search": ["nn-search", "--metric", "cosine"],
    "reconstruct": ["reconstruct", "--input", "x", "--out", "o", "--lpips", "1"],
    "ae-train": ["ae-train", "demo", "ae.grid.levelz=3"],
    "demo": ["demo", "--quik"],
}


@pytest.mark.parametrize("name", NOTHING_FOUND)
def test_nothing_found_is_a_missing_prerequisite(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(NOTHING_FOUND[name], capsys)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err


@pytest.mark.parametrize("name", MISSING_WEIGHTS)
def test_missing_weights_are_a_missing_prerequisite(name, tmp_path, monkeypatch, capsys):
    isolate_weights(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(MISSING_WEIGHTS[name], capsys)
    assert code == 2 and "weight file" in err and "Traceback" not in err, err


@pytest.mark.parametrize("name", BAD_FLAG)
def test_a_bad_flag_or_value_is_a_usage_error(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(BAD_FLAG[name], capsys)
    assert code == 2 and "Traceback" not in err, err


def test_a_misspelt_metric_gets_the_closest_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["eval", "fidd"], capsys)
    assert code == 2 and "did you mean 'fid'?" in err
