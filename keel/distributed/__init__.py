"""Training on several processes and machines: torchrun's process group, counted collectives,
and the two ways ranks keep their weights in step (ddp, diloco)."""

from keel.distributed.comm import Comm
from keel.distributed.sync import DDP, DiLoCo, Sync, make_sync
from keel.distributed.world import World, init_world, shutdown

__all__ = ["Comm", "DDP", "DiLoCo", "Sync", "World", "init_world", "make_sync", "shutdown"]
