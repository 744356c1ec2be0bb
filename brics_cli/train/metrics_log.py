"""metrics.jsonl (and TensorBoard when installed) of a training run, and throughput windows."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from brics_cli.core.files import atomic_write_text, remove_stale_temporaries


def _record(line: str) -> dict[str, Any] | None:
    """The metrics record on one line of metrics.jsonl; None for a partial or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def _scalars(values: dict[str, Any], prefix: str = ""):
    """(tag, value) of every finite number in `values`; a nested record ({"eval": {"fid": ...}}) gives "eval/fid"."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and math.isfinite(value):
            yield prefix + key, value


class MetricsLog:
    """Appends one JSON object per log step to metrics.jsonl; mirrors scalars and sample grids to
    TensorBoard when it is installed (`pip install -e '.[tensorboard]'`). Every record has "step" and
    "time"; an in-training evaluation of the diffusion trainer is a record of its own, {"step", "time",
    "eval": {...}}, so readers of the loss records skip the ones without "loss".

    A resumed or rolled-back run continues from a checkpoint at step S while the logs may hold later
    steps: `truncate_after(S)` drops them from metrics.jsonl and reopens TensorBoard's writer with
    `purge_step = S + 1`, so TensorBoard discards its stale events of those steps too."""

    def __init__(self, folder: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = folder / "metrics.jsonl"
        self.tb_dir = folder / "tensorboard"
        self.tb = None
        if enabled and tensorboard and os.environ.get("BRICS_TENSORBOARD", "1") != "0":  # BRICS_TENSORBOARD=0: jsonl only
            self._open_tensorboard(None)

    def _open_tensorboard(self, purge_step: int | None) -> None:
        if self.tb is not None:
            self.tb.close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.tb_dir), purge_step=purge_step)
        except Exception:  # tensorboard not installed: metrics.jsonl only
            self.tb = None

    def image(self, tag: str, png: Path, step: int) -> None:
        """A sample grid (a PNG the trainer wrote) into TensorBoard."""
        if self.tb is None or not png.is_file():
            return
        import numpy as np
        from PIL import Image

        with Image.open(png) as img:
            self.tb.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")

    def write(self, step: int, values: dict[str, Any], scalars: tuple[str, ...] | None = None) -> None:
        """Append {"step", "time", **values}; TensorBoard gets its numbers (only the tags in `scalars` when given)."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for tag, value in _scalars(values):
                if scalars is None or tag in scalars:
                    self.tb.add_scalar(tag, value, step)

    def records(self) -> list[dict[str, Any]]:
        """The whole records of metrics.jsonl, in order (a torn line is skipped; `truncate_after` reports it)."""
        if not self.path.is_file():
            return []
        return [r for r in map(_record, self.path.read_text(errors="replace").splitlines()) if r is not None]

    def truncate_after(self, step: int) -> None:
        """On resume (and rollback): keep the records up to `step`, so the log has no duplicate steps.

        A line that is not a whole record -- half a line left by a full disk or a kill during an
        append -- is dropped with one warning on stderr; the run then continues.
        """
        if self.tb is not None:  # steps above `step` were logged by a run that did not checkpoint them
            self._open_tensorboard(step + 1)
        if not (self.enabled and self.path.is_file()):
            return
        remove_stale_temporaries(self.path.parent, f".{self.path.name}.tmp*")  # of a rewrite that was killed
        kept, torn = [], []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            record = _record(line)
            if record is None:
                torn.append(number)
            elif record["step"] <= step:
                kept.append(line)
        if torn:
            lines = ", ".join(map(str, torn[:5])) + (", ..." if len(torn) > 5 else "")
            print(f"warning: {self.path}: dropped {len(torn)} partial or undecodable line(s) (line {lines}), "
                  "left by an interrupted write", file=sys.stderr)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

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

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of other work (an evaluation) out of the current window's time."""
        self.start += seconds

    def read(self) -> float:
        """The window's rate; starts the next window."""
        now = self.clock()
        rate = self.items / max(now - self.start, 1e-9)
        self.items, self.start = 0, now
        return rate
