"""Pieces every training loop shares (ae-train, diffusion-train): EMA, stop signals, the NaN
guard, metrics.jsonl / TensorBoard logging and the Rich progress display.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brics_cli.errors import BricsError


class EMA:
    """Exponential moving average of a module's parameters and buffers.

    decay_t = min(decay, (1 + t) / (10 + t)): the average follows the weights closely early on,
    so short runs (the demo) get a useful average instead of one dominated by the initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.updates += 1


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the end of the step and exits 0.

    A second signal while the checkpoint is being written is ignored -- the write finishes.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def checkpoint_or_stop(step: int, steps: int, every: int, stop: StopRequest, rt, save, log) -> str | None:
    """End of a training step: checkpoint when one is due or a stop was requested on any rank.

    Returns the signal's name when the loop must end (after its checkpoint), else None.
    """
    stop_now = rt.any_flag(stop.requested)
    if step % every == 0 or step == steps or stop_now:
        save()
    if not stop_now:
        return None
    name = stop.signal_name or "signal"
    log(f"{name}: checkpoint written at step {step}; rerun the same command to continue")
    return name


class NonFiniteGuard:
    """Counts steps whose loss terms are not finite; stops after `limit` consecutive ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.consecutive = 0
        self.total = 0

    @staticmethod
    def bad_terms(terms: dict[str, float]) -> list[str]:
        return [k for k, v in terms.items() if not math.isfinite(v)]

    def check(self, step: int, terms: dict[str, float], last_checkpoint: Path | None) -> bool:
        """True when the step is good. Raises after `limit` bad steps in a row."""
        bad = self.bad_terms(terms)
        if not bad:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
            raise BricsError(
                f"step {step}: {', '.join(bad)} not finite for {self.consecutive} consecutive steps -- stopped; "
                f"{where}. Lower the learning rate or check the data"
            )
        return False


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


class TrainProgress:
    """Rich progress on stderr: step, img/s, ETA and the latest loss terms (rank 0 only)."""

    def __init__(self, total: int, start: int, enabled: bool, label: str, unit: str = "img/s") -> None:
        self.unit = unit
        self.enabled = enabled and total > start
        self.progress = None
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[terms]}"),
            console=Console(file=sys.stderr), transient=False, refresh_per_second=2,
        )
        self.task = self.progress.add_task(label, total=total, completed=start, rate="", terms="")
        self.progress.start()

    def update(self, step: int, images_per_s: float, terms: dict[str, float]) -> None:
        if self.progress is None:
            return
        shown = " ".join(f"{k}={v:.4g}" for k, v in terms.items())
        self.progress.update(self.task, completed=step, rate=f"{images_per_s:.1f} {self.unit}", terms=shown)

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def png_bytes(image: torch.Tensor) -> bytes:
    """One image (3, H, W) in [-1, 1] -> PNG bytes, rounded to 8 bits."""
    import io

    from PIL import Image

    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def save_image_grid(rows: list[torch.Tensor], path: Path) -> None:
    """Rows of images (B, 3, H, W) in [-1, 1] stacked vertically into one PNG (atomically)."""
    from brics_cli.train.checkpoint import atomic_write_bytes

    grid = torch.cat([torch.cat(list(row.detach().cpu()), dim=2) for row in rows], dim=1)  # (3, rows*H, B*W)
    atomic_write_bytes(path, png_bytes(grid))
