"""One vocabulary of flags: none is eaten by torchrun, and the old spellings still work (hidden, with a warning);
defaults that follow the outputs index (RUN/outputs.json) that `brics sample` and `brics reconstruct` keep."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer.main

from brics_cli.cli import app
from conftest import run_in_process


def visible_long_flags() -> dict[str, set[str]]:
    """Every command path -> the long option names its --help shows."""
    found: dict[str, set[str]] = {}

    def walk(command, path: str) -> None:  # duck-typed: typer ships its own copy of click
        if hasattr(command, "list_commands"):
            ctx = command.context_class(command)
            for name in command.list_commands(ctx):
                walk(command.get_command(ctx, name), f"{path} {name}".strip())
            return
        found[path] = {opt for p in command.params if p.param_type_name == "option" and not p.hidden
                       for opt in p.opts if opt.startswith("--")}

    walk(typer.main.get_command(app), "")
    return found


def test_no_flag_of_any_command_is_taken_by_torchrun():
    from torch.distributed.run import get_args_parser

    torchrun = {opt for action in get_args_parser()._actions for opt in action.option_strings if opt.startswith("--")}
    flags = visible_long_flags()
    assert {"sample", "reconstruct", "eval", "nn-search", "ae-train", "diffusion-train"} <= set(flags)
    # argparse takes an abbreviation of its own options: a brics flag that is a prefix of a torchrun one is
    # parsed by torchrun when it follows `-m brics_cli` (`--n` was ambiguous with --nnodes, --nproc-per-node ...).
    clashes = {(path, flag, t) for path, names in flags.items() for flag in names for t in torchrun
               if t.startswith(flag) and flag not in ("--help",)}
    assert not clashes, sorted(clashes)[:10]


def test_torchrun_passes_the_new_flags_through():
    from torch.distributed.run import get_args_parser

    argv = ["--nproc-per-node", "2", "-m", "brics_cli", "sample", "--from", "runs/demo", "--num-samples", "8", "--out", "s"]
    parsed = get_args_parser().parse_args(argv)
    assert parsed.training_script == "brics_cli" and parsed.training_script_args == argv[4:]


@pytest.mark.parametrize("argv, old, new", [
    (["sample", "--n", "4", "--out", "o", "--from", "nowhere"], "--n", "--num-samples"),
    (["sample", "--num-samples", "4", "--out", "o", "--run", "nowhere"], "--run", "--from"),
    (["reconstruct", "--input", "x", "--out", "o", "--ckpt", "nowhere"], "--ckpt", "--from"),
    (["nn-search", "--samples", "nowhere", "--queries", "3", "--metric", "l2"], "--queries", "--limit"),
    (["eval", "is", "--samples", "nowhere", "--n", "3"], "--n", "--limit"),
    (["eval", "fid", "--samples", "nowhere", "--n-ref", "3"], "--n-ref", "--ref-limit"),
    (["reconstruct", "--input", "x", "--out", "o", "--from", "nowhere", "--n", "3"], "--n", "--limit"),
    (["ae-train", "demo", "data.shards=nowhere", "--run-dir", "r", "--dry-run"], "--run-dir", "--out"),
    (["diffusion-train", "demo", "--ae-run", "nowhere", "--dry-run"], "--ae-run", "--ae"),
])
def test_an_old_flag_still_works_with_a_warning_and_with_its_new_name_is_refused(argv, old, new, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _, err = run_in_process(argv, capsys)  # each fails later (nothing there): the flag itself was taken
    assert f"warning: {old} is deprecated and goes in the next release; use {new}" in err
    assert "No such option" not in err
    value = argv[argv.index(old) + 1]
    code, err = run_in_process([*argv, new, value], capsys)
    assert code == 2 and f"{old} is the old name of {new}: give {new} only" in err


def test_the_old_flags_are_hidden_from_help(capsys):
    for path, names in visible_long_flags().items():
        assert not names & {"--n", "--run", "--ckpt", "--queries", "--n-ref", "--run-dir", "--ae-run"}, path


def _record_many(run: str, start, worker: int) -> None:
    from brics_cli.runs import record_output

    start.wait()  # every writer at once: without the lock, read-modify-write loses entries
    for i in range(20):
        record_output(Path(run) / "checkpoints" / "step-000001.safetensors", "samples", Path(run) / f"out-{worker}-{i}")


def test_concurrent_commands_all_land_in_the_outputs_index(tmp_path):
    import multiprocessing

    from brics_cli.runs import OUTPUTS_INDEX

    run = tmp_path / "diffusion"
    run.mkdir()
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    workers = [ctx.Process(target=_record_many, args=(str(run), start, w)) for w in range(4)]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    entries = json.loads((run / OUTPUTS_INDEX).read_text())["outputs"]
    assert sorted(e["folder"] for e in entries) == sorted(str(run / f"out-{w}-{i}") for w in range(4) for i in range(20))
    assert not [p for p in run.iterdir() if p.name not in (OUTPUTS_INDEX, OUTPUTS_INDEX + ".lock")]  # no temporaries left


def sample_folder(folder: Path, mtime: float) -> Path:
    folder.mkdir(parents=True)
    manifest = {"run": "r", "checkpoint_sha256": "0" * 64, "sampler": "ddim", "steps": 2, "seed": 0, "count": 0, "files": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    os.utime(folder / "manifest.json", (mtime, mtime))
    return folder


def test_the_newest_samples_are_taken_from_the_index_and_the_scan(tmp_path, monkeypatch):
    from brics_cli.errors import ConfigError
    from brics_cli.runs import newest_samples, record_output

    monkeypatch.chdir(tmp_path)
    ckpt = Path("runs/demo/diffusion/checkpoints/step-000010.safetensors")
    with pytest.raises(ConfigError, match=r"no samples found .*`brics sample --from RUN --num-samples N --out DIR`"):
        newest_samples()
    sample_folder(Path("runs/demo/samples"), 100)
    assert newest_samples() == (Path("runs/demo/samples"), "found under runs/")
    for name, mtime in (("elsewhere/ddim", 300), ("elsewhere/old", 50), ("elsewhere/gone", 400)):
        record_output(ckpt, "samples", sample_folder(Path(name), mtime))
    shutil.rmtree("elsewhere/gone")  # a deleted output stays in the index and is passed over
    assert newest_samples() == ((tmp_path / "elsewhere/ddim").resolve(), "recorded in runs/demo/diffusion/outputs.json")
    record_output(ckpt, "samples", Path("runs/demo/samples"))  # found and recorded: one folder, shown as found
    os.utime("runs/demo/samples/manifest.json", (500, 500))
    assert newest_samples() == (Path("runs/demo/samples"), "found under runs/")
    Path("runs/demo/diffusion/outputs.json").write_text("{not json")  # a damaged index only loses what it recorded
    os.utime("runs/demo/samples/manifest.json", (100, 100))
    assert newest_samples() == (Path("runs/demo/samples"), "found under runs/")


def test_eval_recon_takes_the_newest_reconstruction_recorded_by_a_run_under_runs(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from brics_cli.runs import record_output

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    out = tmp_path / "outside" / "recon-val"
    for sub in ("inputs", "recon"):
        (out / sub).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(out / sub / f"{i:06d}.png")
    record_output(tmp_path / "elsewhere-runs" / "demo" / "ae" / "checkpoints" / "step-000001.safetensors", "reconstructions", out)
    code, err = run_in_process(["eval", "recon", "--lpips-net", "none", "--device", "cpu"], capsys)
    assert code == 2 and "no reconstructions found" in err and "brics reconstruct --from RUN" in err  # runs/ records none
    code, err = run_in_process(["eval", "recon", "--lpips-net", "none", "--device", "cpu", "--runs", "elsewhere-runs"], capsys)
    assert code == 0, err
    assert f"reconstructions: {out} (the newest `brics reconstruct` output, recorded in elsewhere-runs/demo/ae/outputs.json" in err
    assert (out / "eval-recon.json").is_file()
