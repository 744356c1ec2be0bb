"""metrics.jsonl (and TensorBoard when installed) of a training run, and throughput windows."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per log step to metrics.jsonl; mirrors scalars to TensorBoard if installed."""

    def __init__(self, folder: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = folder / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(folder / "tensorboard"))
            except Exception:  # tensorboard not installed: metrics.jsonl only
                self.tb = None

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records newer than the checkpoint so the log has no duplicate steps."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Throughput:
    """Items per second over the current logging window.

    Counts what was actually processed, so the short windows (the first after a resume, the last
    one before `steps`) report true rates rather than `batch * log_every / elapsed`.
    """

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.items = 0
        self.start = clock()

    def add(self, n: int) -> None:
        self.items += n

    def read(self) -> float:
        """The window's rate; starts the next window."""
        now = self.clock()
        rate = self.items / max(now - self.start, 1e-9)
        self.items, self.start = 0, now
        return rate
