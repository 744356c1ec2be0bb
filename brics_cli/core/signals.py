"""Stop requests: a signal sets a flag, and long work stops at its next safe point.

SIGINT (Ctrl-C), SIGTERM (`kill`, a scheduler's preemption or time-out, sent to the whole process
group) and SIGUSR1 (what SLURM's `--signal=USR1@SECONDS` sends before the time limit) all mean
"finish what you are doing, save, exit 0": training ends the current step and writes a checkpoint,
`brics sample` finishes the current batch of images. A rerun of the same command continues. A
second signal while the state is being written is ignored -- the write finishes.
"""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


class StopRequest:
    """`with StopRequest() as stop: ... if stop.requested: save and leave`."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
