"""The `brics` command line: every subcommand is wired here, one module each.

Subcommand modules import torch inside their command bodies, so `brics --help` stays instant.
Errors meant for the user (`BricsError`) print one line and exit 1 (runtime) or 2 (usage/config);
`BRICS_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import errno
import inspect
import os
import sys
import threading

import typer
import typer.core

from brics_cli import __version__
from brics_cli.cli import ae_train, demo, diffusion_train, info, nn_search, plugins, reconstruct, recipes, sample, shard, weights
from brics_cli.cli import eval as eval_cli
from brics_cli.errors import BricsError

PIPELINE_ORDER = ("shard", "ae-train", "reconstruct", "diffusion-train", "sample", "eval", "nn-search", "demo", "info",
                  "recipes", "weights", "plugins")


class PipelineOrder(typer.core.TyperGroup):
    """`brics --help` lists the commands in the order a user runs them, not alphabetically."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return [n for n in PIPELINE_ORDER if n in names] + [n for n in names if n not in PIPELINE_ORDER]


app = typer.Typer(
    cls=PipelineOrder,
    name="brics",
    help="BRICS: bi-level feature representation of image collections -- from raw images to samples "
    "and the paper's tables. Run `brics COMMAND --help` for details.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        print(f"brics {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """BRICS toolkit."""


app.command("info")(info.info)
app.command("ae-train")(ae_train.ae_train)
app.command("reconstruct")(reconstruct.reconstruct)
app.command("diffusion-train")(diffusion_train.diffusion_train)
app.command("sample")(sample.sample)
app.command("demo")(demo.demo)
app.add_typer(plugins.app, name="plugins")
app.add_typer(shard.app, name="shard")
app.command("eval")(eval_cli.eval_command)
app.command("nn-search")(nn_search.nn_search_command)
app.add_typer(weights.app, name="weights")
app.add_typer(recipes.app, name="recipes")


def reflow(doc: str | None) -> str | None:
    """A docstring as help text: paragraphs kept, the line breaks inside them joined (the terminal wraps)."""
    if not doc:
        return doc
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


for _typer in (app, plugins.app, weights.app, recipes.app):
    for _info in _typer.registered_commands:
        _info.help = _info.help or reflow(_info.callback.__doc__)


def _report_thread_failure(args) -> None:
    """Background writers (TensorBoard's event thread) hit a full disk too: one warning line, not a traceback."""
    exc = args.exc_value
    if isinstance(exc, OSError) and exc.errno in FILE_SYSTEM_ERRORS and not os.environ.get("BRICS_DEBUG"):
        print(f"warning: a background writer failed: {file_system_message(exc)}", file=sys.stderr)
    else:
        threading.__excepthook__(args)


def main() -> None:
    threading.excepthook = _report_thread_failure
    try:
        app()
    except BricsError as exc:
        if os.environ.get("BRICS_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if os.environ.get("BRICS_DEBUG") or exc.errno not in FILE_SYSTEM_ERRORS:
            raise_or_report(exc)
        print(f"error: {file_system_message(exc)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # a bug, not user input: still one line unless debugging
        raise_or_report(exc)


def raise_or_report(exc: BaseException) -> None:
    if os.environ.get("BRICS_DEBUG"):
        raise exc
    print(f"error: internal error: {type(exc).__name__}: {exc} (rerun with BRICS_DEBUG=1 for the traceback)", file=sys.stderr)
    sys.exit(1)


# Conditions of the machine, not bugs: disk full, quota, file-size limit, permissions, read-only mounts.
FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


def file_system_message(exc: OSError) -> str:
    where = exc.filename or "a file"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free space (or raise the quota / file-size limit) and rerun the same command: it resumes"
    elif exc.errno == errno.EROFS:
        fix = "the file system is read-only: choose a writable --out / run.dir"
    else:
        fix = "fix the permissions or choose another --out / run.dir"
    return f"cannot write {where}: {exc.strerror}; {fix}; files written before are intact"
