"""Where a training process runs: device, rank and world size, determinism (DESIGN.md section 5).

One process on the CPU or one GPU by default. Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK
set) the process group is initialised with NCCL on GPU and gloo on CPU; only rank 0 writes.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from brics_cli.errors import ConfigError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors over ranks in place, in one flat buffer per dtype."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Average a dict of scalars over ranks (every rank passes the same keys)."""
        if not self.distributed:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.world_size).tolist()))

    def max_rank_difference(self, tensors: list[torch.Tensor]) -> float:
        """max |a_r - a_s| over ranks r, s and elements: 0.0 when every rank holds the same values."""
        if not self.distributed or not tensors:
            return 0.0
        flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return float((hi - lo).max())

    def any_flag(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (stop requests, bad steps)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            # Every rank done with its collectives before the group goes: a rank that tears gloo down
            # while another is still in one can abort the process ("terminate called without an
            # active exception"). Bounded, so a rank that died already cannot hang the others.
            try:
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=timedelta(seconds=60))
                else:
                    dist.barrier()
            except Exception:  # another rank is gone: nothing left to wait for
                pass
            dist.destroy_process_group()


def resolve_device(choice: str) -> torch.device:
    """The one `--device` parser: auto (CUDA when visible, else CPU), cpu, cuda or cuda:N.

    Every wrong value -- a misspelling, or CUDA on a machine without it -- is a usage error (exit 2).
    """
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or (choice.startswith("cuda:") and choice[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {choice}: no CUDA device is visible to torch here; use --device cpu")
        return torch.device(choice)
    raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {choice!r}")


def setup_runtime(device: str = "auto") -> Runtime:
    """Initialise the process group when launched by torchrun; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, world_size, local_rank)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
