"""Rich progress bars on stderr shared by `brics eval` and `brics nn-search`: one task per labelled stage."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def stage_progress():
    """Yields `start(label, total) -> advance(n)`. Bars go to stderr, appear with the first stage and are
    erased when done, so a command stopped by an error before any stage prints only its error line."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bars: list[Progress] = []

    def start(label: str, total: int):
        if not bars:
            bars.append(Progress(
                TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True,
            ))
            bars[0].start()
        task = bars[0].add_task(label, total=total)
        return lambda n: bars[0].advance(task, n)

    try:
        yield start
    finally:
        if bars:
            bars[0].stop()


def resolve_device(device: str):
    """auto -> cuda when available, else cpu; anything else must be cpu, cuda or cuda:N."""
    import torch

    from brics_cli.errors import ConfigError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got '{device}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return torch.device(device)


def lazy_bar(start, label: str):
    """A `(step, total)` callback whose bar appears on its first call (e.g. only when an export is needed)."""
    bar = {}

    def advance(step: int, total: int) -> None:
        if "advance" not in bar:
            bar["advance"] = start(label, total or 1)
        bar["advance"](step)

    return advance
