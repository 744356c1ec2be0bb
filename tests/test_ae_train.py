"""`brics ae-train`: resume equivalence, signals, the NaN guard, gradient flow, corrupt shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from brics_cli.models.grid import _level_corners, corner_weights
from brics_cli.models.keycode import key_queries
from brics_cli.recipe import load_recipe
from brics_cli.core import checkpoint as ckpt
from brics_cli.train.ae import AETrainer, accumulation
from brics_cli.core.runtime import Runtime
from conftest import TINY_RECIPE
from test_shard import run_cli


def train_cmd(shards: Path, run: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "brics_cli", "ae-train", str(TINY_RECIPE), f"data.shards={shards}",
            "ae.train.deterministic=true", *overrides, "--out", str(run), "--json"]


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_tensors(ckpt.CheckpointDir(run / "checkpoints").latest())


def test_kill_9_after_a_checkpoint_then_rerun_equals_a_straight_run(tmp_path, tiny_shards):
    steps = ["ae.train.steps=12", "ae.train.checkpoint_every=3"]
    straight = subprocess.run(train_cmd(tiny_shards, tmp_path / "straight", *steps), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(tiny_shards, run, *steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = ckpt.CheckpointDir(run / "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline and not folder.steps():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert folder.steps() and folder.steps()[-1] < 12, "the kill must land in the middle of the run"
    for step in folder.steps():  # whatever exists is complete
        ckpt.read_metadata(folder.path(step))
        ckpt.load_tensors(folder.path(step))
    rerun = subprocess.run(train_cmd(tiny_shards, run, *steps), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout.splitlines()[-1])["resumed_from"] > 0
    a, b = final_tensors(tmp_path / "straight"), final_tensors(run)
    weights = [k for k in a if k.split(".")[0] in ("ae", "ema", "disc", "opt_g", "opt_d")]
    assert weights and set(a) == set(b)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in weights)
    assert worst <= 1e-6, worst
    assert not list((run / "checkpoints").glob(".*tmp*"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6, 8, 10, 12]  # no duplicates after resume


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_sigterm_writes_a_checkpoint_and_exits_0(sig, tmp_path, tiny_shards):
    # SIGUSR1: what SLURM's --signal sends before the time limit.
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(tiny_shards, run, "ae.train.steps=400", "ae.train.checkpoint_every=1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["stopped_by"] == sig.name and 2 <= result["step"] < 400
    assert ckpt.CheckpointDir(run / "checkpoints").steps() == [result["step"]]
    assert "rerun the same command" in err


def test_dry_run_reports_the_plan_and_writes_nothing(tmp_path, tiny_shards, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "ae-train", TINY_RECIPE, f"data.shards={tiny_shards}",
                             "ae.train.micro_batch=2", "--out", tmp_path / "r", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out.splitlines()[-1])
    assert (plan["batch"], plan["micro_batch"], plan["accumulation"], plan["start_step"]) == (4, 2, 2, 0)
    assert not (tmp_path / "r").exists()


def test_accumulation_rule():
    assert accumulation(64, 2, None) == (32, 1)
    assert accumulation(64, 2, 8) == (8, 4)
    with pytest.raises(Exception, match="not divisible"):
        accumulation(10, 4, None)
    with pytest.raises(Exception, match="does not divide"):
        accumulation(12, 1, 5)


def trainer(tmp_path, shards, *overrides) -> AETrainer:
    recipe = load_recipe(TINY_RECIPE, [f"data.shards={shards}", *overrides])
    return AETrainer(recipe, tmp_path / "run", Runtime(torch.device("cpu")))


def test_l2_alone_trains_the_encoder_through_the_grids_and_only_retrieved_entries(tmp_path, tiny_shards):
    t = trainer(tmp_path, tiny_shards, "ae.loss.gan=none")
    grids = t.ae.retrieval.grids
    seen = {}
    t.ae.retrieval.register_forward_hook(lambda m, inp, out: seen.update(z_hat=inp[0].detach()))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    t.generator_step([x])
    for name, p in t.ae.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in t.disc.parameters())
    # Rows with a gradient are exactly rows some query interpolated with non-zero weight.
    q = key_queries(seen["z_hat"], t.ae.cfg.code.key_channels)
    grad = grids.tables.grad  # (G, rows, C_v)
    hit = torch.zeros(grad.shape[:2], dtype=torch.bool)
    for lv in grids.levels:
        idx, frac = _level_corners(q.to(grad.dtype), lv, grids.index_fn, 0)  # rows within the level
        w = corner_weights(frac)
        for g in range(q.shape[0]):
            hit[g, lv.offset + idx[g][w[g] > 0]] = True
    has_grad = grad.abs().sum(-1) > 0
    assert has_grad.any()
    assert not (has_grad & ~hit).any(), "a table row outside the retrieved corners received a gradient"


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, tiny_shards):
    t = trainer(tmp_path, tiny_shards, "ae.loss.gan=none", "ae.train.max_bad_steps=3")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    before = {k: v.clone() for k, v in t.ae.state_dict().items()}
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert t.train_step([bad]) is None and t.guard.total == 1
    assert all(torch.equal(before[k], v) for k, v in t.ae.state_dict().items())  # nothing was updated
    assert t.train_step([x]) is not None and t.guard.consecutive == 0
    t.train_step([bad])
    t.train_step([bad])
    with pytest.raises(Exception, match=r"l2.* not finite for 3 consecutive steps"):
        t.train_step([bad])


def test_a_corrupt_shard_mid_run_is_skipped_and_counted(tmp_path, tiny_shards):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    victim = sorted(shards.glob("train-*.tar"))[1]
    data = bytearray(victim.read_bytes())
    data[2000:6000] = os.urandom(4000)  # garble the middle of the second shard
    victim.write_bytes(bytes(data))
    out = subprocess.run(train_cmd(shards, tmp_path / "run", "ae.train.steps=20", "ae.loss.gan=none"),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["step"] == 20 and result["skipped_samples"] > 0


def test_missing_perceptual_weights_stop_before_any_work(tmp_path, tiny_shards, monkeypatch, capsys):
    from eval_fixtures import isolate_weights

    isolate_weights(monkeypatch, tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "ae-train", TINY_RECIPE, f"data.shards={tiny_shards}",
                             "ae.loss.perceptual_type=lpips-vgg", "ae.loss.perceptual=5", "--out", tmp_path / "r")
    assert code == 2  # a missing prerequisite
    assert "vgg16-397923af.pth" in err and str(tmp_path / "torch" / "hub" / "checkpoints") in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_vgg_l1_perceptual_term_trains_the_generator(tmp_path, tiny_shards, monkeypatch):
    from eval_fixtures import isolate_weights, save_fake_torchvision

    from brics_cli.train.perceptual import build_perceptual

    hub = isolate_weights(monkeypatch, tmp_path)
    monkeypatch.setenv("BRICS_ALLOW_UNVERIFIED_WEIGHTS", "1")
    save_fake_torchvision("vgg16", hub / "vgg16-397923af.pth")
    recipe = load_recipe(TINY_RECIPE, [f"data.shards={tiny_shards}", "ae.loss.gan=none", "ae.loss.l2=0",
                                       "ae.loss.perceptual_type=vgg-l1", "ae.loss.perceptual=5"])
    loss = build_perceptual(recipe.ae.loss, torch.device("cpu"))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == 0 and loss(x, -x).item() > 0
    t = AETrainer(recipe, tmp_path / "run", Runtime(torch.device("cpu")), loss)
    terms, _ = t.generator_step([x])
    assert terms["perceptual"] > 0 and terms["l2"] > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in loss.parameters())  # VGG stays frozen
    assert t.ae.retrieval.grids.tables.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.ae.encoder.parameters())


def test_torchrun_two_cpu_ranks_stay_in_sync_and_follow_the_single_process_loss(tmp_path, tiny_shards):
    common = ["ae.loss.gan=wgan-gp", "ae.train.steps=16", "ae.train.log_every=4", "ae.train.checkpoint_every=100"]
    single = subprocess.run(train_cmd(tiny_shards, tmp_path / "one", *common), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    cmd = train_cmd(tiny_shards, tmp_path / "two", *common)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    multi = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    result = json.loads(multi.stdout.strip().splitlines()[-1])
    assert result["ranks"] == 2 and result["micro_batch"] == 2 and result["step"] == 16
    assert result["rank_param_max_diff"] == 0.0  # identical weights on both ranks
    curve = {}
    for name in ("one", "two"):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        curve[name] = [r["l2"] for r in records]
    assert len(curve["one"]) == len(curve["two"]) == 4
    # Same initialisation and global batch, different (rank-split) data order: the curves agree
    # within the batch-to-batch spread, and both fall.
    for a, b in zip(curve["one"], curve["two"]):
        assert abs(a - b) <= 0.35 * max(a, b), (curve["one"], curve["two"])
    assert curve["two"][-1] < curve["two"][0]


def test_progress_reaches_a_log_file_as_plain_lines(tmp_path, tiny_shards):
    # Under nohup/SLURM stderr is a file: Rich's live bar would print nothing until the end.
    log = tmp_path / "train.log"
    steps, every = 6, 2
    with open(log, "w") as stderr:
        proc = subprocess.run(train_cmd(tiny_shards, tmp_path / "run", f"ae.train.steps={steps}", f"ae.train.log_every={every}",
                                        "ae.train.eval_images=0"), stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert proc.returncode == 0, log.read_text()[-2000:]
    lines = [line for line in log.read_text().splitlines() if line.startswith("ae-train ")]
    assert len(lines) >= steps // every, log.read_text()
    assert lines[-1].startswith(f"ae-train {steps}/{steps} (100%)") and " img/s " in lines[-1] and " l2=" in lines[-1]
    assert "\x1b[" not in log.read_text()  # no terminal control codes in a log file
