"""Which rank this process is: torchrun's environment variables -> a torch.distributed process group.

`torchrun --nproc-per-node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] -m keel rl ...`
sets RANK, WORLD_SIZE and LOCAL_RANK; without them keel is one process and nothing here runs a
collective. The backend follows the device (keel.device.comm_backend): gloo on CPU, nccl on CUDA,
hccl on Ascend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from keel.device import comm_backend


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes the logs, the checkpoints and the model."""
        return self.rank == 0


def init_world(device: torch.device) -> World:
    """Join torchrun's process group (once per process); a plain `python -m keel` run is World()."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    if not dist.is_initialized():
        if device.type != "cpu":
            torch.accelerator.set_device_index(device.index)
        # torchrun keeps its key-value store across restarts, and gloo would find the addresses
        # of the dead attempt's ranks there and try to connect to them: each attempt gets its
        # own key prefix.
        store, rank, size = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"keel/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        # A dead peer fails the collectives of the living within this timeout; torchrun then
        # restarts the group (--max-restarts) and every rank resumes from the last checkpoint.
        dist.init_process_group(backend=comm_backend(device), store=store, rank=rank, world_size=size,
                                timeout=timedelta(minutes=10))
    return World(dist.get_rank(), dist.get_world_size())


def main_process() -> bool:
    """True on torchrun's rank 0, and in a plain single-process run (even outside a process group)."""
    return int(os.environ.get("RANK", "0")) == 0


def elastic_restart() -> bool:
    """True in a group torchrun restarted after a failure: such a run resumes by itself."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
