"""Training on several processes and machines: torchrun's process group, counted collectives,
and the ways ranks keep their weights in step (ddp, diloco, fsdp)."""

from keel.distributed.comm import Comm
from keel.distributed.sync import DDP, FSDP, DiLoCo, Sync, make_sync
from keel.distributed.world import World, init_world, shutdown

__all__ = ["Comm", "DDP", "DiLoCo", "FSDP", "Sync", "World", "init_world", "make_sync", "shutdown"]
