"""Under torchrun every rank draws its own noise, and a resumed multi-rank run equals an uninterrupted one.

Two gloo ranks on the CPU: `torch.multiprocessing` for the draws, `torchrun` for the whole commands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from brics_cli.core.checkpoint import CheckpointDir, load_tensors
from conftest import TINY_RECIPE

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "brics_cli", "--"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _draws(rank: int, world: int, port: int, shards: str, same_seed: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from brics_cli.core.runtime import Runtime
    from brics_cli.recipe import load_recipe
    from brics_cli.train.ae import AETrainer
    from brics_cli.train.diffusion import DiffusionTrainer

    rt = Runtime(torch.device("cpu"), rank, world)
    recipe = load_recipe(TINY_RECIPE, [f"data.shards={shards}"])
    AETrainer(recipe, Path(out) / "ae", rt)
    if same_seed:  # what every rank did before: one seed for all
        torch.manual_seed(recipe.ae.train.seed)
    ae_noise = torch.randn(8)  # the stream the relaxed-precision noise, decoder noise and GP weights come from
    codes = torch.rand(16, 4, 8, 8).half()
    DiffusionTrainer(recipe, Path(out) / "diffusion", rt, Path("none"), codes, {})
    if same_seed:
        torch.manual_seed(recipe.diffusion.train.seed)
    t_eps = torch.rand(8)  # the stream diffusion_loss draws t and eps from
    parts = [None] * world
    dist.all_gather_object(parts, (ae_noise, t_eps))
    if rank == 0:
        torch.save(parts, Path(out) / "draws.pt")
    rt.shutdown()  # the production teardown: a barrier first, so no rank tears gloo down under another


def gathered_draws(tmp_path: Path, shards: Path, same_seed: bool, port: int):
    mp.spawn(_draws, args=(2, port, str(shards), same_seed, str(tmp_path)), nprocs=2, join=True)
    return torch.load(tmp_path / "draws.pt")


def test_two_ranks_draw_different_noise_in_the_same_step(tmp_path, tiny_shards):
    (ae0, t0), (ae1, t1) = gathered_draws(tmp_path, tiny_shards, False, 29611)
    assert not torch.equal(ae0, ae1) and not torch.equal(t0, t1)
    (same_ae0, same_t0), (same_ae1, same_t1) = gathered_draws(tmp_path, tiny_shards, True, 29612)
    assert torch.equal(same_ae0, same_ae1) and torch.equal(same_t0, same_t1)  # the old behaviour, for contrast
    assert not torch.equal(ae0, same_ae0)


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(CheckpointDir(run / "checkpoints").latest())


def interrupt_then_rerun(cmd: list[str], run: Path, at_step: int) -> None:
    proc = subprocess.Popen(TORCHRUN + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 180
    log = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and any(json.loads(line)["step"] >= at_step for line in log.read_text().splitlines() if line.strip()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stderr.read()[-2000:]
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group: torchrun and both ranks, as a scheduler does
    proc.communicate(timeout=180)
    steps = CheckpointDir(run / "checkpoints").steps()
    assert steps and steps[-1] < 16, f"the interruption must checkpoint mid-run, got {steps}"
    rerun = subprocess.run(TORCHRUN + cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("stage", ["ae", "diffusion"])
def test_two_rank_run_interrupted_by_sigterm_to_its_group_then_rerun_equals_an_uninterrupted_one(stage, tmp_path, tiny_shards):
    root = tmp_path / "pipeline"
    common = [f"data.shards={tiny_shards}", f"run.dir={root}", "ae.train.deterministic=true", "ae.train.log_every=1",
              "diffusion.train.log_every=1"]
    if stage == "diffusion":  # one AE for both diffusion runs
        ae = subprocess.run([sys.executable, "-m", "brics_cli", "ae-train", str(TINY_RECIPE), *common, "ae.train.steps=2"],
                            capture_output=True, text=True)
        assert ae.returncode == 0, ae.stderr
    steps = [f"{stage}.train.steps=16", f"{stage}.train.checkpoint_every=100", f"{stage}.train.sample_every=100"]
    straight = tmp_path / "straight"
    run = subprocess.run(TORCHRUN + [f"{stage}-train", str(TINY_RECIPE), *common, *steps, "--out", str(straight)],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    interrupted = tmp_path / "interrupted"
    interrupt_then_rerun([f"{stage}-train", str(TINY_RECIPE), *common, *steps, "--out", str(interrupted)], interrupted, 4)
    assert_bitwise_equal(final_tensors(straight), final_tensors(interrupted))
