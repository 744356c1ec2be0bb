"""Progress of long work on stderr: a live Rich bar in a terminal, plain lines in a log file.

Rich's live display prints nothing to a non-terminal until it stops, so under nohup, SLURM or
`2>train.log` a bar would hide hours of progress. When stderr is not a terminal every task prints
one line instead -- at each `update(..., force=True)` (the training loops' log steps) and at most
every `interval` seconds otherwise:

    ae-train 120/400 (30%) 41.3 img/s elapsed 0:00:31 eta 0:01:12 l2=0.0132 perceptual=0.41

`BRICS_PROGRESS=bar|lines|off` overrides the choice; `BRICS_PROGRESS_INTERVAL` sets the seconds.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_mode(enabled: bool = True) -> str:
    """'bar' (stderr is a terminal), 'lines' (it is not) or 'off'."""
    if not enabled:
        return "off"
    chosen = os.environ.get("BRICS_PROGRESS", "")
    if chosen in ("bar", "lines", "off"):
        return chosen
    return "bar" if sys.stderr.isatty() else "lines"


class Task:
    """One counted piece of work; `advance(n)` or `update(completed)` moves it."""

    def __init__(self, owner: "Progress", label: str, total: int | None, completed: int, unit: str) -> None:
        self.owner, self.label, self.total, self.unit = owner, label, total, unit
        self.completed = self.start = completed
        self.t0 = self.last_line = time.perf_counter()
        self.rate: float | None = None  # set by the caller (e.g. a training window) or measured here
        self.info = ""
        self.bar_id = owner._add_bar(self) if owner.mode == "bar" else None

    def advance(self, n: int = 1, **fields) -> None:
        self.update(self.completed + n, **fields)

    def update(self, completed: int, rate: float | None = None, info: dict[str, float] | None = None, force: bool = False) -> None:
        self.completed = completed
        elapsed = time.perf_counter() - self.t0
        self.rate = rate if rate is not None else (completed - self.start) / max(elapsed, 1e-9)
        if info is not None:
            self.info = " ".join(f"{k}={v:.4g}" for k, v in info.items())
        if self.owner.mode == "bar":
            self.owner._refresh(self)
        elif self.owner.mode == "lines":
            now = time.perf_counter()
            if force or now - self.last_line >= self.owner.interval or completed == self.total:
                self.last_line = now
                self.owner._line(self.describe())

    def eta(self) -> float | None:
        if not self.total or not self.rate:
            return None
        return (self.total - self.completed) / self.rate

    def describe(self) -> str:
        parts = [f"{self.label} {self.completed}" + (f"/{self.total} ({100 * self.completed / self.total:.0f}%)" if self.total else "")]
        if self.rate is not None:
            parts.append(f"{self.rate:.1f} {self.unit}/s")
        parts.append(f"elapsed {_clock(time.perf_counter() - self.t0)}")
        eta = self.eta()
        if eta is not None:
            parts.append(f"eta {_clock(eta)}")
        if self.info:
            parts.append(self.info)
        return " ".join(parts)


class Progress:
    """Context manager holding the tasks of one command (only the main rank should enable it)."""

    def __init__(self, enabled: bool = True, transient: bool = False, interval: float | None = None) -> None:
        self.mode = progress_mode(enabled)
        self.interval = interval if interval is not None else float(os.environ.get("BRICS_PROGRESS_INTERVAL", "10"))
        self.transient = transient
        self._rich = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def task(self, label: str, total: int | None = None, completed: int = 0, unit: str = "img") -> Task:
        return Task(self, label, total, completed, unit)

    def lazy(self, label: str, unit: str = "img") -> Callable[[int, int], None]:
        """A `(steps, total)` callback whose task appears on its first call (e.g. only when an export runs)."""
        holder: list[Task] = []

        def advance(step: int, total: int) -> None:
            if not holder:
                holder.append(self.task(label, total or 1, unit=unit))
            holder[0].advance(step)

        return advance

    def stage(self, label: str, total: int) -> Callable[[int], None]:
        """`advance(n)` of a new task: the shape metric code takes (`ProgressFactory`)."""
        return self.task(label, total).advance

    def log(self, message: str) -> None:
        """A message on stderr that does not break the bar (shown even when progress is off)."""
        if self._rich is not None:
            self._rich.console.print(message, markup=False, highlight=False)
        else:
            self._line(message)

    def _line(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def _add_bar(self, task: Task):
        if self._rich is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=Console(file=sys.stderr), transient=self.transient, refresh_per_second=2,
            )
            self._rich.start()
        return self._rich.add_task(task.label, total=task.total, completed=task.completed, rate="", info="")

    def _refresh(self, task: Task) -> None:
        rate = f"{task.rate:.1f} {task.unit}/s" if task.rate is not None else ""
        self._rich.update(task.bar_id, completed=task.completed, rate=rate, info=task.info)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
