"""`diffusion-train` at scale: the code cache encoded by every rank, micro-batches, bf16, compile, one batch key.

The encode runs under two real gloo ranks (`torch.multiprocessing`, one thread each, as under
torchrun with OMP_NUM_THREADS=1) and is compared byte for byte with one process's cache.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from brics_cli.config import build, move_renamed_keys, to_dict
from brics_cli.core import checkpoint as ckpt
from brics_cli.core.runtime import Runtime
from brics_cli.diffusion.config import DiffusionStageConfig
from brics_cli.diffusion.loss import diffusion_loss
from brics_cli.errors import ConfigError
from brics_cli.recipe import load_recipe
from brics_cli.train.diffusion import DiffusionTrainer
from conftest import TINY_RECIPE, brics

RENAMED = "diffusion.optim.batch is now diffusion.train.batch (the global batch, like ae.train.batch)"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_shards) -> Path:
    """RUN.DIR with a 2-step AE run, its one-process code cache and a 1-step diffusion run."""
    root = tmp_path_factory.mktemp("scale")
    brics("ae-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={root}", "ae.train.steps=2")
    brics("diffusion-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={root}", "diffusion.train.steps=1")
    return root


def ae_checkpoint(root: Path) -> Path:
    return ckpt.CheckpointDir(root / "ae" / "checkpoints").latest()


def one_process_cache(root: Path) -> Path:
    (folder,) = (root / "codes").iterdir()
    return folder


# -- micro-batches, bf16, compile -----------------------------------------------------------------


def trainer(tmp_path: Path, *overrides: str) -> DiffusionTrainer:
    recipe = load_recipe(TINY_RECIPE, ["data.shards=unused", f"run.dir={tmp_path}", *overrides])
    codes = torch.rand(32, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()  # (N, C_z, H_z, W_z)
    return DiffusionTrainer(recipe, tmp_path / "diffusion", Runtime(torch.device("cpu")), Path("none"), codes, {})


def one_step(tmp_path: Path, *overrides: str) -> tuple[DiffusionTrainer, dict[str, float]]:
    t = trainer(tmp_path, *overrides)  # built and stepped before the next one: the global RNG is shared
    return t, t.train_step()


def test_micro_batches_accumulate_to_the_update_of_the_full_batch(tmp_path, one_thread):
    full, full_values = one_step(tmp_path)
    micro, micro_values = one_step(tmp_path, "diffusion.train.micro_batch=2")
    assert (full.micro, full.accum, micro.micro, micro.accum) == (8, 1, 2, 4)
    for (name, a), b in zip(full.unet.named_parameters(), micro.unet.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-6, name  # the accumulated gradient is the full batch's
        assert (a - b).abs().max() <= 1e-6, name  # and so is the Adam step taken with it
    for a, b in zip(full.ema.module.parameters(), micro.ema.module.parameters()):
        assert (a - b).abs().max() <= 1e-6
    assert abs(full_values["loss"] - micro_values["loss"]) <= 1e-6
    assert abs(full_values["grad_norm"] - micro_values["grad_norm"]) <= 1e-6


def test_the_trainers_micro_batch_loss_is_diffusion_loss(tmp_path):
    t = trainer(tmp_path)
    x0 = torch.rand(8, 4, 8, 8) * 2 - 1
    with torch.random.fork_rng(devices=[]):
        reference, ref_terms = diffusion_loss(t.unet, t.schedule, x0)
    t_draw = torch.rand(8)  # the same stream, drawn in diffusion_loss's order: t, then eps
    eps = torch.randn(x0.shape)
    loss, terms = t.micro_batch_loss(x0, t_draw, eps)
    assert torch.equal(loss, reference) and all(torch.equal(terms[k], ref_terms[k]) for k in ref_terms)


def test_compile_wraps_the_training_model_and_leaves_the_checkpointed_unet_plain(tmp_path):
    # A real CPU compile of even this UNet takes about a minute (inductor builds C++): it runs in
    # test_a_compiled_step_on_cuda_matches_the_eager_step; here, that the flag reaches the model.
    t = trainer(tmp_path, "diffusion.train.compile=true")
    assert isinstance(t.model, torch._dynamo.eval_frame.OptimizedModule) and t.model._orig_mod is t.unet
    assert isinstance(trainer(tmp_path).model, type(t.unet))


def test_micro_batch_and_bf16_on_the_cpu_give_the_undisturbed_runs_checkpoint(pipeline, tiny_shards, tmp_path):
    common = ["diffusion-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={pipeline}", "diffusion.train.steps=1"]
    plan = brics(*common, "diffusion.train.micro_batch=2", "diffusion.train.bf16=true", "diffusion.train.compile=true",
                 "--out", tmp_path / "planned", "--dry-run", "--json")
    assert {k: v for k, v in json.loads(plan.stdout.splitlines()[-1]).items()
            if k in ("batch", "micro_batch", "accumulation", "bf16", "compile")} == {
        "batch": 8, "micro_batch": 2, "accumulation": 4, "bf16": True, "compile": True}
    assert not (tmp_path / "planned").exists()
    brics(*common, "diffusion.train.micro_batch=2", "diffusion.train.bf16=true", "--out", tmp_path / "micro")
    undisturbed = ckpt.load_tensors(ckpt.CheckpointDir(pipeline / "diffusion" / "checkpoints").latest())
    micro = ckpt.load_tensors(ckpt.CheckpointDir(tmp_path / "micro" / "checkpoints").latest())
    weights = [k for k in undisturbed if k.startswith(("unet.", "ema."))]
    assert weights and max((undisturbed[k] - micro[k]).abs().max().item() for k in weights) <= 1e-6


@pytest.mark.parametrize("overrides, message", [
    (["diffusion.train.micro_batch=3"],
     "diffusion.train.micro_batch=3 does not divide the per-rank batch 8 (= diffusion.train.batch 8 / 1 ranks)"),
    (["diffusion.train.micro_batch=0"], "diffusion.train.micro_batch must be >= 1 or null, got 0"),
])
def test_a_micro_batch_that_does_not_fit_is_refused_in_one_line(pipeline, tiny_shards, tmp_path, overrides, message):
    out = brics("diffusion-train", TINY_RECIPE, f"data.shards={tiny_shards}", f"run.dir={pipeline}", *overrides,
                "--out", tmp_path / "r", "--dry-run", check=False)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def _ddp_steps(rank: int, world: int, port: int, out: str) -> None:
    """One rank: a step of the per-rank batch at once, then a fresh run of the same step in micro-batches."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    rt = Runtime(torch.device("cpu"), rank, world)
    runs = {}
    for name, overrides in (("full", []), ("micro", ["diffusion.train.micro_batch=2"])):
        recipe = load_recipe(TINY_RECIPE, ["data.shards=unused", f"run.dir={out}", *overrides])
        codes = torch.rand(32, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
        t = DiffusionTrainer(recipe, Path(out) / name, rt, Path("none"), codes, {})
        t.train_step()
        runs[name] = (t, [p.detach().clone() for p in t.unet.parameters()])
    (full, a), (micro, b) = runs["full"], runs["micro"]
    result = {"accum": micro.accum, "max_diff": max((x - y).abs().max().item() for x, y in zip(a, b)),
              "rank_diff": rt.max_rank_difference(b)}
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(result))
    rt.shutdown()  # the production teardown: a barrier first, so no rank tears gloo down under another


def test_micro_batches_under_ddp_sync_once_and_give_the_full_batch_step(tmp_path):
    mp.spawn(_ddp_steps, args=(2, 29635, str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert result["accum"] == 2 and result["max_diff"] <= 1e-6 and result["rank_diff"] == 0.0, result


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_trainer(tmp_path: Path, *overrides: str) -> DiffusionTrainer:
    recipe = load_recipe(TINY_RECIPE, ["data.shards=unused", f"run.dir={tmp_path}", *overrides])
    codes = torch.rand(32, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    return DiffusionTrainer(recipe, tmp_path / "diffusion", Runtime(torch.device("cuda")), Path("none"), codes, {})


@cuda
def test_bf16_autocasts_the_unet_on_cuda_and_keeps_the_loss_fp32(tmp_path):
    t = cuda_trainer(tmp_path, "diffusion.train.bf16=true")
    seen = {}
    t.unet.register_forward_hook(lambda m, inp, out: seen.update(dtype=out.dtype))
    values = t.train_step()
    assert seen["dtype"] == torch.bfloat16 and values is not None and values["loss"] > 0
    assert all(p.dtype == torch.float32 for p in t.unet.parameters())


@cuda
def test_a_compiled_step_on_cuda_matches_the_eager_step(tmp_path):
    eager = cuda_trainer(tmp_path)
    eager_values = eager.train_step()
    compiled = cuda_trainer(tmp_path, "diffusion.train.compile=true")
    compiled_values = compiled.train_step()
    assert abs(eager_values["loss"] - compiled_values["loss"]) <= 1e-4
    for a, b in zip(eager.unet.parameters(), compiled.unet.parameters()):
        assert (a - b).abs().max() <= 1e-4


# -- one name for the global batch ----------------------------------------------------------------


def test_the_old_batch_key_is_refused_with_its_new_name(tiny_shards, tmp_path):
    out = brics("diffusion-train", TINY_RECIPE, "diffusion.optim.batch=16", "--dry-run", check=False)
    assert out.returncode == 2 and out.stderr.strip() == f"error: override 'diffusion.optim.batch=16': {RENAMED}"
    old = tmp_path / "old.yaml"
    text = TINY_RECIPE.read_text().replace("ema: 0.99}", "ema: 0.99, batch: 8}")
    old.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "batch: 8}" in row)
    out = brics("diffusion-train", old, f"data.shards={tiny_shards}", "--dry-run", check=False)
    assert out.returncode == 2 and out.stderr.strip() == f"error: {old}:{line}: {RENAMED}"


def test_an_older_checkpoints_config_with_the_old_key_still_builds():
    saved = to_dict(load_recipe(TINY_RECIPE))
    saved["diffusion"]["optim"]["batch"] = saved["diffusion"]["train"].pop("batch")  # as brics wrote it before
    with pytest.raises(ConfigError, match="diffusion.optim.batch is now diffusion.train.batch"):
        build(DiffusionStageConfig, saved["diffusion"], "diffusion")
    stage = build(DiffusionStageConfig, move_renamed_keys(saved)["diffusion"], "diffusion")
    assert stage.train.batch == 8 and "batch" in saved["diffusion"]["optim"]  # the stored tree is left as it was


# -- the code cache under two ranks ---------------------------------------------------------------


def _encode(rank: int, world: int, port: int, task: str, ae_ckpt: str, shards: str, folder: str, out: str) -> None:
    """One rank: `cached` runs what diffusion-train runs (lock, encode, read back); `parts` encodes
    with 16-image parts, so that both ranks have parts to encode."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))  # a hang fails, not waits
    from brics_cli.models.autoencoder import BRICSAutoencoder
    from brics_cli.train.diffusion import encode_dataset
    from brics_cli.train.launch import _cached_codes

    rt = Runtime(torch.device("cpu"), rank, world)
    recipe = load_recipe(TINY_RECIPE, [f"data.shards={shards}"])
    result: dict = {}
    try:
        if task == "cached":
            codes, record = _cached_codes(recipe, Path(ae_ckpt), Path(folder), rt)
            torch.save(codes, Path(out) / f"codes-{rank}.pt")
        else:
            ae = BRICSAutoencoder.from_checkpoint(Path(ae_ckpt), ema=True)
            record = encode_dataset(ae, recipe.data, Path(folder), rt, part_size=16)
        result["record"] = record
    except Exception as exc:  # each rank's own outcome, for the test to read
        result["error"] = f"{type(exc).__name__}: {exc}"
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(result))
    rt.shutdown()  # the production teardown: a barrier first, so no rank tears gloo down under another


def encode_on_two_ranks(task: str, pipeline: Path, shards: Path, folder: Path, out: Path, port: int) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_encode, args=(2, port, task, str(ae_checkpoint(pipeline)), str(shards), str(folder), str(out)), nprocs=2)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


def one_process_parts(pipeline: Path, shards: Path, folder: Path) -> None:
    from brics_cli.models.autoencoder import BRICSAutoencoder
    from brics_cli.train.diffusion import encode_dataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        ae = BRICSAutoencoder.from_checkpoint(ae_checkpoint(pipeline), ema=True)
        recipe = load_recipe(TINY_RECIPE, [f"data.shards={shards}"])
        encode_dataset(ae, recipe.data, folder, Runtime(torch.device("cpu")), part_size=16, show_progress=False)
    finally:
        torch.set_num_threads(threads)


def part_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.safetensors")) if p.is_file()}


def test_two_ranks_encode_the_cache_one_process_encodes_bit_for_bit(pipeline, tiny_shards, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("BRICS_PROGRESS", "lines")
    ranks = encode_on_two_ranks("cached", pipeline, tiny_shards, tmp_path / "cached", tmp_path / "out", 29631)
    reference = one_process_cache(pipeline)  # diffusion-train's own, one process
    assert part_bytes(tmp_path / "cached") == part_bytes(reference) and len(part_bytes(reference)) == 1
    two = [torch.load(tmp_path / "out" / f"codes-{r}.pt") for r in range(2)]
    one = ckpt.load_tensors(reference / "part-000000.safetensors")["codes"]
    assert torch.equal(two[0], one) and torch.equal(two[1], one)  # every rank reads the whole cache back
    assert ranks[0]["record"]["ranks"] == 2 and ranks[0]["record"] == ranks[1]["record"]
    same = ("parts", "images", "codes", "flip", "corrupt_skipped")
    assert {k: ranks[0]["record"][k] for k in same} == {k: json.loads((reference / "done.json").read_text())[k] for k in same}

    ranks = encode_on_two_ranks("parts", pipeline, tiny_shards, tmp_path / "two", tmp_path / "out2", 29632)
    one_process_parts(pipeline, tiny_shards, tmp_path / "one")
    assert not any("error" in r for r in ranks), ranks
    assert list(part_bytes(tmp_path / "two")) == [f"part-{p:06d}.safetensors" for p in range(4)]  # 64 images / 16
    assert part_bytes(tmp_path / "two") == part_bytes(tmp_path / "one")
    progress = [line for line in capfd.readouterr().err.splitlines() if line.startswith("encode (rank 0's share")]
    assert progress and progress[-1].startswith("encode (rank 0's share: 1/2 of the parts) 32/32 (100%)")  # parts 0 and 2


def test_a_rank_that_fails_stops_both_and_the_rerun_encodes_only_the_missing_parts(pipeline, tiny_shards, tmp_path):
    one_process_parts(pipeline, tiny_shards, tmp_path / "one")
    folder = tmp_path / "two"
    (folder / "part-000001.safetensors").mkdir(parents=True)  # rank 1 cannot write its first part there
    ranks = encode_on_two_ranks("parts", pipeline, tiny_shards, folder, tmp_path / "out", 29633)  # returns: nobody hangs
    assert ranks[1]["error"].startswith("IsADirectoryError") and "part-000001.safetensors" in ranks[1]["error"]
    assert ranks[0]["error"] == (f"BricsError: {folder}: another rank failed while encoding its parts (its error is above); "
                                 "rerun: the parts already written are kept")
    assert sorted(part_bytes(folder)) == ["part-000000.safetensors", "part-000002.safetensors"]  # rank 0's
    assert not (folder / "done.json").exists()
    kept = {name: (folder / name).stat() for name in part_bytes(folder)}
    (folder / "part-000001.safetensors").rmdir()  # the fault is fixed
    torn = (tmp_path / "one" / "part-000003.safetensors").read_bytes()[:100]
    (folder / ".part-000003.safetensors.tmp4242").write_bytes(torn)  # and a killed writer left a torn temporary
    ranks = encode_on_two_ranks("parts", pipeline, tiny_shards, folder, tmp_path / "out2", 29634)
    assert not any("error" in r for r in ranks), ranks
    assert part_bytes(folder) == part_bytes(tmp_path / "one") and (folder / "done.json").is_file()
    for name, before in kept.items():  # not encoded again
        after = (folder / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    assert not list(folder.glob(".*tmp*"))
