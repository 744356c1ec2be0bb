"""What keeps a long run safe: stop signals that end with a checkpoint, and the non-finite guard."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from brics_cli.errors import BricsError


def grad_norm(params: list[Tensor]) -> float:
    """The global L2 norm of the parameters' gradients (0.0 when none has one)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


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
