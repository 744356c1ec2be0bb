"""Evaluation under torchrun: each rank measures a share of the images, and the shares are gathered.

A share is a contiguous block of whole batches -- the batches one process forms -- so every image
goes through the network in the same batch as without torchrun and its features, distances and
per-pair metrics are the single-process ones bit for bit (CPU and GPU kernels may round differently
for another batch size). Gathered in rank order, the blocks are the files in order. Results travel
as CPU tensors / arrays through `all_gather_object` (gloo or NCCL). Only rank 0 writes caches and
results; the others return None from the commands.

A failure on one rank is sent to all of them at the next gather (`failing_together` closes the
commands with one), so no rank waits for ever on a dead one: rank 0 raises it (the CLI prints its
one line) and the others leave quietly with its exit code.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch.distributed as dist

from brics_cli.core.runtime import Runtime
from brics_cli.errors import BricsError

T = TypeVar("T")


def batch_block(n_items: int, batch: int, rt: Runtime | None) -> range:
    """This rank's items: a contiguous block of the ceil(n_items / batch) batches (all of them without torchrun)."""
    if rt is None or not rt.distributed:
        return range(n_items)
    n_batches = -(-n_items // batch)
    first, last = rt.rank * n_batches // rt.world_size, (rt.rank + 1) * n_batches // rt.world_size
    return range(min(first * batch, n_items), min(last * batch, n_items))


def gather(rt: Runtime | None, work: Callable[[], T]) -> list[T]:
    """`work()` on every rank; every rank's result, in rank order, on every rank."""
    if rt is None or not rt.distributed:
        return [work()]
    failure, error = None, None
    try:
        mine = work()
    except Exception as exc:  # sent to the others, who would otherwise wait for this rank's part
        mine, error = None, exc
        failure = (type(exc), str(exc)) if isinstance(exc, BricsError) else (BricsError, f"rank {rt.rank}: {type(exc).__name__}: {exc}")
    parts: list = [None] * rt.world_size
    dist.all_gather_object(parts, (failure, mine))
    failures = [failed for failed, _ in parts if failed is not None]
    if failures and not rt.is_main:
        raise SystemExit(getattr(failures[0][0], "exit_code", 1))  # rank 0 prints the message: once, not once per rank
    if failures:
        if error is None:
            cls, message = failures[0]
            error = cls(message)
        error.sent_to_every_rank = True  # type: ignore[attr-defined]
        raise error
    return [part for _, part in parts]


@contextmanager
def failing_together(rt: Runtime | None) -> Iterator[None]:
    """A block every rank runs: a failure on any rank ends all of them, with one message (rank 0's).

    A failure outside a `gather` is sent at the other ranks' next gather, or at the one closing the
    block, so no rank leaves the block while another may still fail in it.
    """
    try:
        yield
        gather(rt, lambda: None)
    except Exception as exc:
        if rt is None or not rt.distributed or getattr(exc, "sent_to_every_rank", False):
            raise
        gather(rt, lambda: _raise(exc))


def _raise(exc: Exception) -> None:
    raise exc


def from_main(rt: Runtime | None, work: Callable[[], T]) -> T:
    """`work()` on rank 0 alone (it may fill a cache, e.g. the shard export); its result on every rank."""
    is_main = rt is None or rt.is_main
    return gather(rt, lambda: work() if is_main else None)[0]


def everywhere(rt: Runtime | None, flag: bool) -> bool:
    """True when `flag` is true on every rank (a cache every rank can read), so all ranks take one branch."""
    return all(gather(rt, lambda: flag))
