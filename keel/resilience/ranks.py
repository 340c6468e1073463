"""One checkpoint for all ranks, written by rank 0.

Most of a run's state is the same on every rank (DDP weights and optimizer, DiLoCo's global
weights and outer momentum, step counters); some is not: RNG states, data cursors, and under
DiLoCo the local weights and inner optimizer. Rank 0 gathers the rank-local parts and stores
them as `<part>@<rank>`; on resume each rank takes its own back. A single process keeps the
plain layout.
"""

from __future__ import annotations

from keel.distributed.comm import Comm
from keel.errors import KeelError
from keel.resilience.checkpoint import flatten, unflatten


def gather_state(tensors: dict, meta: dict, local: tuple[str, ...], comm: Comm):
    """(tensors, meta) holding every rank's local parts, on rank 0; None on the other ranks."""
    size = comm.world.size
    if size == 1:
        return tensors, meta
    mine = flatten({g: tensors[g] for g in local if g in tensors})
    parts = comm.gather_to_main(mine, {k: meta[k] for k in local if k in meta}, "checkpoint")
    if parts is None:
        return None
    tensors = {g: t for g, t in tensors.items() if g not in local}
    meta = {k: v for k, v in meta.items() if k not in local} | {"world_size": size}
    for rank, (flat, rank_meta) in enumerate(parts):
        tensors |= {f"{g}@{rank}": t for g, t in unflatten(flat).items()}
        meta |= {f"{k}@{rank}": v for k, v in rank_meta.items()}
    return tensors, meta


def rank_state(tensors: dict, meta: dict, local: tuple[str, ...], rank: int, size: int):
    """This rank's view of a checkpoint written by `gather_state`."""
    saved = meta.get("world_size", 1)
    if saved != size:
        raise KeelError(f"the checkpoint was written by {saved} rank(s) and this run has {size}: resume with "
                        f"{saved} processes in all (as many as wrote it), or start a fresh run")
    if size == 1:
        return tensors, meta
    tensors = {g: t for g, t in tensors.items() if "@" not in g} | {
        g.partition("@")[0]: t for g, t in tensors.items() if g.endswith(f"@{rank}")}
    meta = {k: v for k, v in meta.items() if "@" not in k} | {
        k.partition("@")[0]: v for k, v in meta.items() if k.endswith(f"@{rank}")}
    return tensors, meta
