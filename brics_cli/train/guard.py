"""What keeps a long run safe: stop signals that end with a checkpoint, and the divergence guard.

The divergence guard never lets a model it would not trust reach a checkpoint. A step is bad when
a loss term or gradient norm is not finite (the step is skipped: the weights do not change) or when
the weights after it fail `WeightCheck`. Every checkpoint is written only after the model passes
the check, so the newest checkpoint is always a good one; after `max_bad_steps` bad steps in a row,
or when a checkpoint is due and the model fails, the trainer rolls back to it (weights, EMA,
optimiser moments, RNG and data position) and says so in one line. Rolling back replays the same
steps from the same state: it cures what does not repeat (a flipped bit, a non-deterministic
kernel), and a divergence that does repeat stops the run after `max_rollbacks` rollbacks to the
same checkpoint, with one line naming it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from brics_cli.core import checkpoint as ckpt
from brics_cli.core.signals import StopRequest  # re-exported: the trainers' stop signals
from brics_cli.errors import BricsError, ConfigError

__all__ = ["DivergenceGuard", "StopRequest", "WeightCheck", "bad_terms", "checkpoint_or_stop", "grad_norm", "read_resumable",
           "load_checked"]


def grad_norm(params: list[Tensor]) -> float:
    """The global L2 norm of the parameters' gradients (0.0 when none has one)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def bad_terms(terms: dict[str, float]) -> list[str]:
    """The names of the values that are not finite."""
    return [k for k, v in terms.items() if not math.isfinite(v)]


def checkpoint_or_stop(step: int, steps: int, every: int, stop: StopRequest, rt, save, log, refused) -> str | None:
    """End of a training step: checkpoint when one is due or a stop was requested on any rank.

    `save()` returns why it would not write the model (it failed the weight check) or None once
    written; a refused checkpoint calls `refused(why)` (the trainer rolls back), except on a stop,
    which leaves with nothing written. Returns the signal's name when the loop must end, else None.
    """
    stop_now = rt.any_flag(stop.requested)
    if not (step % every == 0 or step == steps or stop_now):
        return None
    why = save()
    if not stop_now:
        if why:
            refused(why)
        return None
    name = stop.signal_name or "signal"
    if why:
        log(f"{name}: step {step} not checkpointed ({why}); rerun the same command to continue from the last good checkpoint")
    else:
        log(f"{name}: checkpoint written at step {step}; rerun the same command to continue")
    return name


class WeightCheck:
    """Would we checkpoint these weights? Per module (e.g. "ae", "ema", "disc"): every parameter
    finite, and the RMS of all its parameters at most `max_rms` and at most `max_growth` times the
    RMS it had at the last check that passed.

    The bounds, measured on tests/recipes/tiny.yaml: a healthy step moves the RMS by < 0.03%
    (Adam moves each element by about the learning rate), a 100x too large learning rate by ~45% a
    step, and `ae.optim.lr=1e12` by a factor of 1e11 in one step -- while the loss of that step is
    still finite. Doubling within a step is an explosion, not learning. The absolute bound leaves
    100x headroom above the largest weights brics stores: StyleGAN's mapping layers keep
    N(0, 1) / lr_multiplier, an RMS of 100.
    """

    def __init__(self, max_growth: float = 2.0, max_rms: float = 1e4) -> None:
        self.max_growth = max_growth
        self.max_rms = max_rms
        self.reference: dict[str, float] = {}  # RMS per module at the last check that passed

    @staticmethod
    def measure(modules: dict[str, nn.Module]) -> dict[str, float]:
        """RMS of each module's parameters; float64 so that 1e20-sized weights read as large, not inf."""
        rms = []
        for module in modules.values():
            params = [p.detach() for p in module.parameters()]
            norms = torch.stack([torch.linalg.vector_norm(p, dtype=torch.float64) for p in params])
            rms.append(torch.linalg.vector_norm(norms) / math.sqrt(max(sum(p.numel() for p in params), 1)))
        return dict(zip(modules, torch.stack(rms).tolist()))  # one device sync for all modules

    def problem(self, measured: dict[str, float]) -> str | None:
        """Why these weights fail the check, or None."""
        for name, rms in measured.items():
            if not math.isfinite(rms):
                return f"{name} weights not finite"
            if rms > self.max_rms:
                return f"{name} weight RMS {rms:.3g} > {self.max_rms:.0e}"
            before = self.reference.get(name)
            if before and rms > self.max_growth * before:
                return f"{name} weight RMS grew {rms / before:.3g}x since the last good step ({before:.3g} -> {rms:.3g})"
        return None

    def accept(self, measured: dict[str, float]) -> None:
        self.reference = dict(measured)


class DivergenceGuard:
    """Counts bad steps and decides when to roll back, and when rolling back no longer helps.

    `fix` ends the stop message: what the user should change (e.g. "lower ae.optim.lr ...").
    """

    def __init__(self, limit: int, max_rollbacks: int, fix: str) -> None:
        self.limit = limit
        self.max_rollbacks = max_rollbacks
        self.fix = fix
        self.weights = WeightCheck()
        self.consecutive = 0
        self.total = 0  # bad steps over the whole run, rolled-back ones included
        self.cause = ""  # the problem of the streak's first bad step: what went wrong first
        self.must_roll_back = False
        self.target: Path | None = None  # the checkpoint to roll back to
        self.rollbacks = 0  # rollbacks in a row to `target`
        self.message = ""  # the one line to print when rolling back

    def weights_problem(self, modules: dict[str, nn.Module], rt, fresh: bool = False) -> str | None:
        """Why these weights must not be checkpointed -- the same answer on every rank -- or None
        (then they become the growth test's reference). `fresh`: just built or loaded, no growth test."""
        if fresh:
            self.weights.reference = {}
        measured = self.weights.measure(modules)
        problem = self.weights.problem(measured)
        if rt.any_flag(problem is not None):
            return problem or "weights fail the check on another rank"
        self.weights.accept(measured)
        return None

    def good(self) -> None:
        self.consecutive = 0

    def bad(self, step: int, problem: str, last_good: Path | None) -> None:
        """Count a bad step; after `limit` in a row, roll back (raises when nothing is left to roll back to)."""
        if self.consecutive == 0:
            self.cause = problem
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            self.end_streak(step, last_good)

    def checkpoint_refused(self, step: int, problem: str, last_good: Path | None) -> None:
        """A checkpoint was due and the model failed the check: roll back now instead of writing it."""
        if self.consecutive == 0:
            self.cause, self.consecutive = problem, 1
        self.end_streak(step, last_good)

    def end_streak(self, step: int, last_good: Path | None) -> None:
        """Sets `must_roll_back` (and the line to print), or raises when rolling back cannot help."""
        steps = "1 step" if self.consecutive == 1 else f"{self.consecutive} consecutive steps"
        what = f"step {step}: {self.cause} for {steps}"
        if last_good is None:
            raise BricsError(f"{what} -- stopped; no checkpoint had been written yet. To fix: {self.fix}")
        repeats = self.rollbacks + 1 if last_good == self.target else 1
        if repeats > self.max_rollbacks:
            again = f", again after {self.max_rollbacks} rollbacks to {last_good.name}" if self.max_rollbacks else ""
            raise BricsError(f"{what}{again} -- stopped; the last good checkpoint is {last_good}. To fix: {self.fix}")
        self.target, self.rollbacks, self.must_roll_back = last_good, repeats, True
        self.message = f"{what} -- rolled back to {last_good.name} (rollback {repeats} of at most {self.max_rollbacks})"

    def rolled_back(self, total_before: int) -> None:
        """After the trainer reloaded `target`: a fresh streak; the run's bad-step count keeps counting."""
        self.must_roll_back, self.consecutive, self.total = False, 0, total_before


def read_resumable(path: Path, kind: str, require: tuple[str, ...], recipe, fix: str) -> dict:
    """The metadata of a checkpoint to resume a `kind` run from, refused (exit 2) when it is another
    stage's or was trained with settings the recipe changed since; `fix` says how to start afresh."""
    meta = ckpt.read_metadata(path, require=("kind", *require))
    if meta["kind"] != kind:
        raise BricsError(f"{path}: not {'an autoencoder' if kind == 'ae' else 'a ' + kind} checkpoint")
    changed = recipe.resume_conflicts(meta["config"], kind)
    if changed:
        raise ConfigError(f"{path.parent.parent}: its checkpoints were trained with different {', '.join(changed)}; "
                          f"{fix} or restore the recipe")
    return meta


def load_checked(path: Path, meta: dict, load_state, guard: "DivergenceGuard", modules: list[nn.Module], rt) -> None:
    """Load a checkpoint's tensors with `load_state(tensors, meta)`, then hold the weights to the
    divergence check: a file that does not load, or loads weights the guard would not trust, raises
    `UnusableCheckpoint`, so that the caller falls back to the previous checkpoint."""
    tensors = ckpt.load_tensors(path, device=rt.device)
    try:
        load_state(tensors, meta)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:  # damaged: missing tensors or fields
        raise ckpt.UnusableCheckpoint(f"{path}: its state does not load ({str(exc).splitlines()[0]!r}); the file is damaged") from exc
    problem = guard.weights_problem(modules, rt, fresh=True)
    if problem:  # written by a brics without the weight check, or damaged on disk
        raise ckpt.UnusableCheckpoint(f"{path}: its weights fail the divergence check ({problem})")
