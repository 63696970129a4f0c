"""The process seam: rank, world size, is-main, and the few collective calls the loop makes.

One process today reports rank 0 of 1 and every call is a no-op; several processes (accelerate / torchrun set
RANK, WORLD_SIZE, LOCAL_RANK) fill the same calls in, so the loop and the writers never ask how many there are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files, logs and progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (a NaN or a Ctrl-C on one rank stops all)."""
        if not self.active:
            return flag
        t = torch.tensor([float(flag)], device=_collective_device())
        torch.distributed.all_reduce(t)
        return bool(t.item())


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def current() -> Dist:
    """This process's place, from the launcher's environment variables (one process when none are set)."""
    env = os.environ
    return Dist(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
