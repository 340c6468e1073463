"""One checkpoint for all ranks.

Most of a run's state is the same on every rank (DDP weights and optimizer, DiLoCo's global
weights and outer momentum, step counters); some is not: RNG states, data cursors, and under
DiLoCo the local weights and inner optimizer. Rank 0 gathers the rank-local parts and stores
them as `<part>@<rank>`; on resume each rank takes its own back. A single process keeps the
plain layout. (Under sync: fsdp the model and optimizer are not gathered: every rank writes its
own shards, see keel.resilience.checkpoint.)

A checkpoint is resumed by as many ranks as wrote it, except a sharded one (sync: fsdp), whose
model and optimizer DCP reshards onto any number of ranks. Its rank-local parts cannot be mapped
onto other ranks as they are: rank r keeps its own RNG streams when the checkpoint has a rank r
(KEPT), and restarts them from the seed otherwise (its streams must differ from every other
rank's); the other parts (data cursors: each rank's shard of the data changes with the number of
ranks) restart from the seed.
"""

from __future__ import annotations

from keel.distributed.comm import Comm
from keel.errors import KeelError
from keel.resilience.checkpoint import flatten, unflatten

KEPT = ("rng",)  # rank-local parts a rank keeps on another number of ranks, when the checkpoint has its own


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


def saved_world_size(meta: dict) -> int:
    """How many ranks wrote a checkpoint, from its trainer meta."""
    return meta.get("world_size", 1)


def rank_state(tensors: dict, meta: dict, local: tuple[str, ...], rank: int, size: int, fresh: tuple | None = None):
    """This rank's view of a checkpoint written by `gather_state`. A checkpoint written by another
    number of ranks is refused unless `fresh` is given (a sharded checkpoint: this rank's own
    (tensors, meta) as the run started, for the local parts that restart from the seed)."""
    saved = saved_world_size(meta)
    if saved != size and fresh is None:
        raise KeelError(f"the checkpoint was written by {saved} rank(s) and this run has {size}: resume with "
                        f"{saved} processes in all (as many as wrote it), or start a fresh run")
    if saved > 1:  # the rank-local parts are stored per rank
        tensors = {g: t for g, t in tensors.items() if "@" not in g} | {
            g.partition("@")[0]: t for g, t in tensors.items() if g.endswith(f"@{rank}")}
        meta = {k: v for k, v in meta.items() if "@" not in k} | {
            k.partition("@")[0]: v for k, v in meta.items() if k.endswith(f"@{rank}")}
    if saved != size:
        restarted = restarted_parts(local, rank, saved)
        fresh_tensors, fresh_meta = fresh
        tensors = {g: t for g, t in tensors.items() if g not in restarted} | {
            g: fresh_tensors[g] for g in restarted if g in fresh_tensors}
        meta = {k: v for k, v in meta.items() if k not in restarted} | {
            k: fresh_meta[k] for k in restarted if k in fresh_meta}
    return tensors, meta


def restarted_parts(local: tuple[str, ...], rank: int, saved: int) -> list[str]:
    """The rank-local parts rank `rank` restarts from the seed when resuming a checkpoint that
    `saved` ranks wrote onto another number of ranks."""
    return [p for p in local if p not in KEPT or rank >= saved]
