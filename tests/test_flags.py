"""One vocabulary of flags: none is eaten by torchrun, and the old spellings still work (hidden, with a warning)."""

from __future__ import annotations

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
