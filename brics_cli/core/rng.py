"""Random streams per rank, and their place in a checkpoint.

Under torchrun every rank must draw its own noise (diffusion t and eps, relaxed-precision noise,
decoder noise, gradient-penalty mixing weights) -- with one seed on every rank, 2 GPUs would see 32
distinct draws in a global batch of 64. So a trainer seeds once with the recipe's seed to build its
model (every rank builds the same weights; DDP broadcasts rank 0's anyway), then re-seeds each
rank with `rank_seed(seed, rank)`.

A checkpoint holds every rank's states: tensors `rng.r<rank>.<name>` (torch, cuda, and the trainer's
own generators) and, in the metadata, `rng.ranks[rank]` (Python's and NumPy's states). Resuming
restores each rank's own. Resuming with another number of ranks is allowed: the ranks that existed
restore their states, new ranks start from `rank_seed(seed + step, rank)`, and the run goes on
correctly, though not bit for bit as an uninterrupted one would (the trainers say so).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for `rank`, different for every (seed, rank) pair."""
    digest = hashlib.sha256(f"brics-rank:{int(seed)}:{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_rank(seed: int, rank: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for this rank."""
    s = rank_seed(seed, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def local_state(generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: tensors (torch, cuda, named generators) and JSON-able Python/NumPy states."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    for name, generator in (generators or {}).items():
        tensors[name] = generator.get_state()
    py = random.getstate()
    np_state = np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def gather_states(rt, generators: dict[str, torch.Generator] | None = None, **extra: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every rank's states in checkpoint form (`rng.r<rank>.<name>` tensors, {"ranks": [...]} metadata),
    with `extra` JSON-able per-rank values (e.g. `data=` the reading position) in each rank's entry.
    A collective under torchrun: every rank must call it; rank 0 writes the result."""
    tensors, meta = local_state(generators)
    meta.update(extra)
    parts = [(tensors, meta)]
    if rt.distributed:
        import torch.distributed as dist

        parts = [None] * rt.world_size
        dist.all_gather_object(parts, ({k: v.cpu() for k, v in tensors.items()}, meta))
    flat = {f"rng.r{rank}.{name}": value for rank, (t, _) in enumerate(parts) for name, value in t.items()}
    return flat, {"ranks": [m for _, m in parts]}


def restore_states(tensors: dict[str, torch.Tensor], meta: dict[str, Any], rank: int,
                   generators: dict[str, torch.Generator] | None = None) -> dict[str, Any] | None:
    """Restore `rank`'s states from a checkpoint and return its entry (with any `extra` values);
    None when the checkpoint has none for it (a rank its run did not have).

    Checkpoints from before per-rank states (`rng.torch`, metadata {"python", "numpy"}) count as rank 0's."""
    if "ranks" not in meta:  # the single-stream layout of earlier versions
        tensors = {f"rng.r0.{k[4:]}": v for k, v in tensors.items() if k.startswith("rng.")}
        meta = {"ranks": [meta]}
    if rank >= len(meta["ranks"]):
        return None
    prefix = f"rng.r{rank}."
    mine = {k[len(prefix):]: v.cpu() for k, v in tensors.items() if k.startswith(prefix)}
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
    for name, generator in (generators or {}).items():
        if name in mine:
            generator.set_state(mine[name])
    version, state, gauss = meta["ranks"][rank]["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, *rest = meta["ranks"][rank]["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    return meta["ranks"][rank]
