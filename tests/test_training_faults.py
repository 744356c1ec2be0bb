"""Training faults, reproduced for real (issue #15): a diverging learning rate, a flipped weight, a
torn metrics.jsonl, a truncated or damaged checkpoint, and writers killed mid-write by the kernel.

Each test checks the exit code, the one line brics prints, and -- where a rerun finishes the job --
that the final weights equal an undisturbed run's (`ae.train.deterministic=true`).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from brics_cli.core import checkpoint as ckpt
from brics_cli.core.runtime import Runtime
from brics_cli.errors import BricsError
from brics_cli.recipe import load_recipe
from brics_cli.train.ae import AETrainer
from brics_cli.train.guard import WeightCheck
from conftest import TINY_RECIPE
from test_shard import run_cli

FINAL = "step-000008.safetensors"  # the tiny recipe trains 8 steps, checkpoints at 4 and 8, logs every 2
# A child that dies of SIGXFSZ, as a process does when the kernel refuses a write past RLIMIT_FSIZE:
# killed in the middle of that write (Python itself ignores SIGXFSZ and would get EFBIG instead).
KILLED_BY_THE_KERNEL = ("import runpy, signal; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
                        "runpy.run_module('brics_cli', run_name='__main__', alter_sys=True)")


def brics(*args, file_limit: int | None = None, kill: bool = False) -> subprocess.CompletedProcess:
    """`python -m brics_cli ARGS`. With `file_limit` (at least 4 kB: multiprocessing's first shared-memory
    arena is a file of one page), a write beyond that size fails as on a full disk -- or, with `kill`,
    kills the process in the middle of that write."""
    if file_limit is None:
        return subprocess.run([sys.executable, "-m", "brics_cli", *map(str, args)], capture_output=True, text=True)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    # A .pyc write must not be what fails, nor TensorBoard's event files (its own thread): the writer
    # under test is the one each test names.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "BRICS_TENSORBOARD": "0"}
    start = ["-c", KILLED_BY_THE_KERNEL] if kill else ["-m", "brics_cli"]
    return subprocess.run([sys.executable, *start, *map(str, args)], capture_output=True, text=True, preexec_fn=limit, env=env)


def ae_train(shards: Path, run: Path, *overrides: str, **limits) -> subprocess.CompletedProcess:
    return brics("ae-train", TINY_RECIPE, f"data.shards={shards}", "ae.train.deterministic=true", *overrides,
                 "--out", run, "--json", **limits)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The run's one `error:` line (and no traceback)."""
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return line


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = ckpt.load_tensors(a), ckpt.load_tensors(b)
    keys = [k for k in ta if not k.startswith("rng.")]
    assert keys and set(ta) == set(tb)
    worst = max((ta[k].double() - tb[k].double()).abs().max().item() for k in keys)
    assert worst <= 1e-6, worst


def assert_sane(path: Path, prefixes: tuple[str, ...]) -> None:
    """Every weight finite and each model's RMS far from an explosion (the guard's own bound is 1e4)."""
    tensors = ckpt.load_tensors(path)
    for prefix in prefixes:
        weights = [v.double() for k, v in tensors.items() if k.startswith(prefix + ".") and v.is_floating_point()]
        assert weights and all(torch.isfinite(w).all() for w in weights), (path, prefix)
        rms = math.sqrt(sum(w.square().sum().item() for w in weights) / sum(w.numel() for w in weights))
        assert rms < 100, (path, prefix, rms)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_shards) -> Path:
    """An undisturbed deterministic run of the tiny recipe."""
    run = tmp_path_factory.mktemp("straight") / "run"
    out = ae_train(tiny_shards, run)
    assert out.returncode == 0, out.stderr
    return run


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_shards) -> Path:
    """RUN.DIR with a 4-step ae run, its code cache and a 4-step diffusion run (checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("pipeline")
    for out in (brics("ae-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={root}", "ae.train.steps=4"),
                brics("diffusion-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={root}",
                      "diffusion.train.steps=4", "diffusion.train.checkpoint_every=2")):
        assert out.returncode == 0, out.stderr[-3000:]
    return root


# -- the divergence guard -------------------------------------------------------------------------


def test_weight_check_bounds_growth_within_a_step_and_absolute_size():
    layer = torch.nn.Linear(8, 8)
    check = WeightCheck()
    check.accept(check.measure({"net": layer}))
    with torch.no_grad():
        layer.weight.mul_(1.5)
    assert check.problem(check.measure({"net": layer})) is None  # large for one step, but no explosion
    with torch.no_grad():
        layer.weight.mul_(3.0)
        layer.bias.mul_(3.0)
    assert "net weight RMS grew" in check.problem(check.measure({"net": layer}))
    check.accept({})
    with torch.no_grad():
        layer.weight.fill_(1e21)  # (1e21)^2 overflows float32: still measured as a size, not as inf
    rms = 1e21 * math.sqrt(64 / 72)  # 64 weights of 1e21, 8 (comparatively) zero biases
    assert check.problem(check.measure({"net": layer})) == f"net weight RMS {rms:.3g} > 1e+04"
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    assert check.problem(check.measure({"net": layer})) == "net weights not finite"


def test_a_learning_rate_that_blows_up_the_weights_is_never_checkpointed(tmp_path, tiny_shards):
    # ae.optim.lr=1e12 keeps the loss finite for the step that makes the weights ~1e12: brics used to
    # checkpoint them (black reconstructions) and name one as "the last good checkpoint".
    run = tmp_path / "run"
    out = ae_train(tiny_shards, run, "ae.optim.lr=1e12", "ae.train.checkpoint_every=3")
    assert out.returncode == 1
    line = error_line(out)
    assert "step 3: ae weight RMS" in line and "no checkpoint had been written yet" in line and "ae.optim.lr" in line
    assert ckpt.CheckpointDir(run / "checkpoints").steps() == []


def test_a_diverging_discriminator_rolls_back_then_stops_naming_the_last_good_checkpoint(tmp_path, tiny_shards,
                                                                                         monkeypatch, capsys):
    # The discriminator first trains at step 5 (gan_start=4), with d_lr=1e12: a real divergence that
    # repeats after every rollback, since a rollback replays the same data from the same RNG state.
    run = tmp_path / "run"
    out = ae_train(tiny_shards, run, "ae.optim.d_lr=1e12", "ae.loss.gan_start=4", "ae.train.steps=40",
                   "ae.train.checkpoint_every=2", "ae.train.max_bad_steps=3", "ae.train.max_rollbacks=2")
    assert out.returncode == 1
    rollbacks = [line for line in out.stderr.splitlines() if "rolled back to step-000004.safetensors" in line]
    assert len(rollbacks) == 2 and "disc weight RMS" in rollbacks[0], out.stderr
    line = error_line(out)
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step-000004.safetensors'}" in line
    assert "again after 2 rollbacks" in line
    kept = ckpt.CheckpointDir(run / "checkpoints")
    assert kept.steps() == [2, 4]
    logged = steps_logged(run)
    assert logged == sorted(set(logged))  # the rolled-back records were dropped, not duplicated
    for path in kept.newest_first():
        assert_sane(path, ("ae", "ema", "disc"))
        code, stdout, err = run_cli(monkeypatch, capsys, "reconstruct", "--from", path, "--input", tiny_shards,
                                    "--out", tmp_path / path.stem, "--limit", 4, "--device", "cpu", "--json")
        assert code == 0, err
        psnr = json.loads(stdout.splitlines()[-1])["psnr"]["mean"]
        assert psnr is not None and 3 < psnr < 60, psnr  # a NaN model reconstructs black: PSNR null


def test_sigterm_during_a_divergence_exits_0_without_checkpointing_the_diverged_model(tmp_path, tiny_shards):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "brics_cli", "ae-train", str(TINY_RECIPE), f"data.shards={tiny_shards}", "ae.optim.d_lr=1e12",
           "ae.loss.gan_start=4", "ae.train.steps=400", "ae.train.max_bad_steps=3", "--out", str(run), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the first rollback: back at step 4, and step 5 diverges again
        seen.append(line)
        if "rolled back to step-000004.safetensors" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(seen) + err
    assert "SIGTERM: step 5 not checkpointed (disc weight RMS" in err and "rerun the same command" in err
    assert json.loads(out.splitlines()[-1])["stopped_by"] == "SIGTERM"
    assert ckpt.CheckpointDir(run / "checkpoints").steps() == [4]
    assert_sane(run / "checkpoints" / "step-000004.safetensors", ("ae", "ema", "disc"))


def test_a_flipped_weight_is_rolled_back_and_the_run_ends_as_if_undisturbed(tmp_path, tiny_shards, straight, capsys):
    # A transient fault -- a weight turned to inf in memory, as a flipped exponent bit does -- does
    # not repeat after a rollback: the run continues from the last checkpoint and finishes exactly.
    recipe = load_recipe(TINY_RECIPE, [f"data.shards={tiny_shards}", "ae.train.deterministic=true", "ae.train.steps=4"])
    try:
        trainer = AETrainer(recipe, tmp_path / "run", Runtime(torch.device("cpu")))
        trainer.run(show_progress=False)
        with torch.no_grad():
            trainer.ae.decoder.mapping[0].weight[0, 0] = float("inf")
        trainer.cfg.steps = 8
        result = trainer.run(show_progress=False)
    finally:
        torch.use_deterministic_algorithms(False)  # set by ae.train.deterministic, for this whole process
    assert result["step"] == 8 and result["bad_steps"] >= 1
    assert "rolled back to step-000004.safetensors (rollback 1 of at most 2)" in capsys.readouterr().err
    assert_same_weights(straight / "checkpoints" / FINAL, trainer.checkpoints.path(8))


def test_diffusion_divergence_keeps_good_checkpoints_and_a_lower_rate_continues(tmp_path, pipeline, tiny_shards,
                                                                                 monkeypatch, capsys):
    run = tmp_path / "diffusion"
    shutil.copytree(pipeline / "diffusion", run)
    common = ["diffusion-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={pipeline}", "--out", run,
              "diffusion.train.checkpoint_every=2", "--json"]
    out = brics(*common, "diffusion.optim.lr=1e12")  # diffusion.optim may change on resume: it takes effect
    assert out.returncode == 1
    assert sum("rolled back to step-000004.safetensors" in line for line in out.stderr.splitlines()) == 2
    line = error_line(out)
    assert "unet weight RMS" in line and f"the last good checkpoint is {run / 'checkpoints' / 'step-000004.safetensors'}" in line
    kept = ckpt.CheckpointDir(run / "checkpoints")
    assert kept.steps() == [2, 4]
    for path in kept.newest_first():
        assert_sane(path, ("unet", "ema"))
        code, _, err = run_cli(monkeypatch, capsys, "sample", "--from", path, "--num-samples", 2, "--steps", 4, "--device", "cpu",
                               "--out", tmp_path / path.stem)
        assert code == 0, err
        for png in sorted((tmp_path / path.stem).glob("0*.png")):
            assert np.asarray(Image.open(png), dtype=np.float64).std() > 1  # not the flat image of a NaN model
    fixed = brics(*common)  # the recipe's learning rate again: continues from the last good checkpoint
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout.splitlines()[-1])["resumed_from"] == 4
    assert kept.steps()[-1] == 8


# -- metrics.jsonl --------------------------------------------------------------------------------


def test_a_torn_metrics_line_is_dropped_with_a_warning_and_the_run_continues(tmp_path, tiny_shards, straight):
    run = tmp_path / "run"
    assert ae_train(tiny_shards, run, "ae.train.steps=4").returncode == 0
    last = (run / "metrics.jsonl").read_text().splitlines()[-1]
    with open(run / "metrics.jsonl", "a") as f:  # half a record, as a write cut short leaves it
        f.write(last.replace('"step": 4', '"step": 6')[: len(last) // 2])
    rerun = ae_train(tiny_shards, run)
    assert rerun.returncode == 0, rerun.stderr
    [warning] = [line for line in rerun.stderr.splitlines() if line.startswith("warning:")]
    assert str(run / "metrics.jsonl") in warning and "dropped 1 partial" in warning
    assert steps_logged(run) == [2, 4, 6, 8]
    assert_same_weights(straight / "checkpoints" / FINAL, run / "checkpoints" / FINAL)


def test_a_full_disk_during_a_metrics_append_then_a_rerun_equals_an_undisturbed_run(tmp_path, tiny_shards, straight):
    run = tmp_path / "run"
    full = ae_train(tiny_shards, run, "ae.train.steps=40", "ae.train.log_every=1", "ae.train.checkpoint_every=1000",
                    "ae.train.sample_every=1000", file_limit=4096)  # config.yaml is ~2.3 kB, a record ~0.5 kB
    assert full.returncode == 1 and "Traceback" not in full.stderr
    text = (run / "metrics.jsonl").read_text()
    assert len(text) == 4096 and not text.endswith("\n")  # a real torn line, cut at the limit
    rerun = ae_train(tiny_shards, run)
    assert rerun.returncode == 0, rerun.stderr
    assert any(line.startswith("warning:") and "metrics.jsonl" in line for line in rerun.stderr.splitlines())
    assert steps_logged(run) == [2, 4, 6, 8]
    assert_same_weights(straight / "checkpoints" / FINAL, run / "checkpoints" / FINAL)


# -- checkpoints ----------------------------------------------------------------------------------


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_shards, straight):
    run = tmp_path / "run"
    assert ae_train(tiny_shards, run).returncode == 0
    newest = run / "checkpoints" / FINAL
    os.truncate(newest, newest.stat().st_size // 2)
    rerun = ae_train(tiny_shards, run)
    assert rerun.returncode == 0, rerun.stderr
    [skipped] = [line for line in rerun.stderr.splitlines() if line.startswith("warning:")]
    assert f"skipped {newest}: not a readable brics checkpoint (truncated: " in skipped
    assert f"resuming {run} from step 4 (step-000004.safetensors)" in rerun.stderr
    assert json.loads(rerun.stdout.splitlines()[-1])["resumed_from"] == 4
    assert steps_logged(run) == [2, 4, 6, 8]
    assert_same_weights(straight / "checkpoints" / FINAL, run / "checkpoints" / FINAL)


def test_damaged_checkpoint_metadata_is_one_line_never_a_traceback(tmp_path, tiny_shards, straight, pipeline):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    source = straight / "checkpoints" / "step-000004.safetensors"
    tensors, meta = ckpt.load_tensors(source), ckpt.read_metadata(source)
    ckpt.save_tensors_atomic(folder / "step-000004.safetensors", tensors, {k: v for k, v in meta.items() if k != "config"})
    save_file(tensors, str(folder / FINAL), metadata={"brics": json.dumps(meta)[:200]})  # JSON cut short
    out = ae_train(tiny_shards, tmp_path / "run")
    assert out.returncode == 1
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2 and "is not valid JSON" in warnings[0] and "lacks 'config'" in warnings[1]
    line = error_line(out)
    assert f"{folder}: no usable checkpoint (2 tried" in line and "move the folder away" in line
    assert sorted(p.name for p in folder.iterdir()) == ["step-000004.safetensors", FINAL]  # untouched
    # The trainers' resume itself: a BricsError, one line, naming the file and the missing key.
    recipe = load_recipe(TINY_RECIPE, [f"data.shards={tiny_shards}"])
    with pytest.raises(BricsError, match=r"step-000004.safetensors: its brics metadata lacks 'config'") as info:
        AETrainer(recipe, tmp_path / "t", Runtime(torch.device("cpu"))).resume(folder / "step-000004.safetensors")
    assert "\n" not in str(info.value)
    from brics_cli.train.diffusion import DiffusionTrainer

    source = pipeline / "diffusion" / "checkpoints" / "step-000002.safetensors"
    tensors, meta = ckpt.load_tensors(source), ckpt.read_metadata(source)
    ckpt.save_tensors_atomic(tmp_path / "d.safetensors", tensors, {k: v for k, v in meta.items() if k != "lr_scheduler"})
    trainer = DiffusionTrainer(recipe, tmp_path / "d", Runtime(torch.device("cpu")), source, torch.rand(8, 4, 8, 8).half(), {})
    with pytest.raises(BricsError, match=r"d.safetensors: its brics metadata lacks 'lr_scheduler'"):
        trainer.resume(tmp_path / "d.safetensors")


# -- temporaries ----------------------------------------------------------------------------------


def test_a_checkpoint_write_killed_by_the_kernel_leaves_nothing_after_the_rerun(tmp_path, tiny_shards, straight):
    run = tmp_path / "run"
    killed = ae_train(tiny_shards, run, file_limit=500_000, kill=True)  # a checkpoint is ~2.5 MB
    assert killed.returncode == -25  # SIGXFSZ: died in the middle of writing step-000004
    assert list((run / "checkpoints").glob(".*tmp*"))  # what it left: the temporary it was writing
    rerun = ae_train(tiny_shards, run)
    assert rerun.returncode == 0, rerun.stderr
    assert not list(run.rglob(".*tmp*"))
    assert_same_weights(straight / "checkpoints" / FINAL, run / "checkpoints" / FINAL)


def test_the_code_cache_has_no_temporaries_after_a_rerun(tmp_path, tiny_shards, pipeline):
    [cached] = (pipeline / "codes").iterdir()  # the undisturbed encode of the same AE and data
    common = ["diffusion-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={tmp_path}", "--ae", pipeline / "ae",
              "diffusion.train.steps=2"]
    killed = brics(*common, file_limit=32_000, kill=True)  # a part of the tiny cache is ~66 kB
    assert killed.returncode == -25
    codes = tmp_path / "codes" / cached.name
    assert list(codes.glob(".*tmp*")) and not (codes / "done.json").exists()
    # A kill while done.json is written (its writer, killed by the kernel in the same way).
    writer = ("import json, resource, signal, sys; from brics_cli.core.files import atomic_write_json; "
              "signal.signal(signal.SIGXFSZ, signal.SIG_DFL); resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64)); "
              "atomic_write_json(sys.argv[1], json.loads(sys.argv[2]))")
    done = subprocess.run([sys.executable, "-c", writer, codes / "done.json", (cached / "done.json").read_text()])
    assert done.returncode == -25 and list(codes.glob(".done.json.tmp*"))
    rerun = brics(*common)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in codes.iterdir()) == sorted(p.name for p in cached.iterdir())  # no temporaries
    for part in codes.glob("part-*.safetensors"):
        assert part.read_bytes() == (cached / part.name).read_bytes()
