"""Collectives that count what they send.

Every collective keel runs goes through `Comm`, which adds the payload (the tensor's bytes, as
this rank hands it to the collective) to a per-purpose counter, so a step's row can say exactly
what it sent: `comm_bytes` for the step and `comm_s` spent inside collectives. A ring all-reduce
moves about twice its payload over each rank's link (reduce-scatter, then all-gather); that wire
factor is used only to estimate time on a simulated link (`link_gbps`, `link_latency_ms`), never
for the byte counts, which the tests check against the tensors' sizes.

FSDP2 runs its own all-gathers and reduce-scatters; `count_fsdp` hands each sharded module
counted ones through FSDP2's public `set_custom_all_gather` / `set_custom_reduce_scatter`, so they
land here too, as "fsdp". `fsdp_pass_bytes` says what they come to from the parameters' shapes.

With one process every call returns at once and counts nothing: nothing crossed a wire.
`Comm.sub(group)` runs the same collectives within a subgroup of the ranks (DiLoCo over FSDP: the
ranks of one shard group, or the ranks holding the same shard in every group) and counts into the
same tallies, so a step's `comm_bytes` holds everything this rank sent.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from keel.distributed.world import World


class Comm:
    def __init__(self, world: World, device: torch.device, link_gbps: float = 0.0, link_latency_ms: float = 0.0):
        self.world = world
        self.group = None  # the default group: every rank
        # gloo works on host tensors; nccl/hccl/xccl on the accelerator's own.
        self.device = device if world.size > 1 and dist.get_backend() != "gloo" else torch.device("cpu")
        self.link_bytes_per_s = link_gbps * 1e9 / 8
        self.link_latency_s = link_latency_ms / 1e3
        self.bytes: Counter = Counter()  # by purpose, since the run (re)started
        self._step = {"bytes": 0, "s": 0.0, "link_s": 0.0}  # this step's; shared with `sub` views
        self._step_bytes: Counter = Counter()  # this step's by purpose; shared with `sub` views

    def sub(self, group: dist.ProcessGroup) -> Comm:
        """The same collectives within `group` (a subset of the ranks; ranks and sources numbered
        within it), counted into this Comm's tallies."""
        view = copy.copy(self)  # shares `bytes` and `_step`
        view.group, view.world = group, World(dist.get_rank(group), dist.get_world_size(group))
        return view

    def _count(self, payload: int, wire: float, purpose: str, seconds: float) -> None:
        self.bytes[purpose] += payload
        self._step_bytes[purpose] += payload
        self._step["bytes"] += payload
        self._step["s"] += seconds
        if self.link_bytes_per_s:
            self._step["link_s"] += self.link_latency_s + wire / self.link_bytes_per_s

    def all_reduce(self, t: torch.Tensor, purpose: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In place; returns `t`."""
        if self.world.size > 1:
            n = self.world.size
            start = time.perf_counter()
            dist.all_reduce(t, op=op, group=self.group)
            self._count(t.numel() * t.element_size(), 2 * (n - 1) / n * t.numel() * t.element_size(),
                        purpose, time.perf_counter() - start)
        return t

    def all_reduce_async(self, t: torch.Tensor, purpose: str) -> torch.futures.Future:
        """Sum `t` in place over the ranks without waiting for it (a DDP bucket, sent while the
        backward goes on); counted when launched. Its time overlaps the backward: not in `comm_s`."""
        n = self.world.size
        fut = dist.all_reduce(t, group=self.group, async_op=True).get_future()
        self._count(t.numel() * t.element_size(), 2 * (n - 1) / n * t.numel() * t.element_size(), purpose, 0.0)
        return fut

    def all_gather(self, t: torch.Tensor, purpose: str) -> list[torch.Tensor]:
        """Every rank's `t` (same shape on all), in rank order."""
        if self.world.size == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world.size)]
        start = time.perf_counter()
        dist.all_gather(out, t, group=self.group)
        payload = t.numel() * t.element_size()
        self._count(payload, (self.world.size - 1) * payload, purpose, time.perf_counter() - start)
        return out

    def broadcast(self, t: torch.Tensor, purpose: str, src: int = 0) -> torch.Tensor:
        """In place from rank `src`; returns `t`."""
        if self.world.size > 1:
            start = time.perf_counter()
            dist.broadcast(t, group=self.group, group_src=src)
            payload = t.numel() * t.element_size() if self.world.rank == src else 0
            self._count(payload, payload, purpose, time.perf_counter() - start)
        return t

    def gather_to_main(self, tensors: dict[str, torch.Tensor], meta: dict, purpose: str) -> list | None:
        """[(tensors, meta) of rank 0, 1, ...] on rank 0, None elsewhere. For checkpoints: host
        tensors and plain JSON-able metadata, exchanged between keel's own processes."""
        if self.world.size == 1:
            return [(tensors, meta)]
        out = [None] * self.world.size if self.world.main else None
        start = time.perf_counter()
        dist.gather_object((tensors, meta), out, group=self.group, group_dst=0)
        payload = 0 if self.world.main else sum(t.numel() * t.element_size() for t in tensors.values())
        self._count(payload, payload, purpose, time.perf_counter() - start)
        return out

    def scalar(self, value: float, purpose: str, op=dist.ReduceOp.SUM) -> float:
        return self.all_reduce(torch.tensor([float(value)], dtype=torch.float64, device=self.device), purpose, op).item()

    def barrier(self) -> None:
        if self.world.size > 1:
            dist.barrier(group=self.group)

    def take_step(self) -> dict:
        """This step's communication figures for its metrics row (`comm_bytes`, and per purpose
        `comm_bytes_<purpose>` for each that sent anything); resets the step counters."""
        row = {"comm_bytes": self._step["bytes"], "comm_s": self._step["s"]}
        row.update({f"comm_bytes_{purpose}": n for purpose, n in sorted(self._step_bytes.items()) if n})
        if self.link_bytes_per_s:
            row["link_s"] = self._step["link_s"]
        self._step.update(bytes=0, s=0.0, link_s=0.0)
        self._step_bytes.clear()
        return row


class CountedAllGather:
    """FSDP2's all-gather (torch's default: `dist.all_gather_single` into a plain buffer), counted
    into `comm` as "fsdp": the shard this rank hands in; on the wire it receives the other ranks'."""

    def __init__(self, comm: Comm):
        self.comm = comm

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        start = time.perf_counter()
        work = dist.all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)
        payload = input_tensor.numel() * input_tensor.element_size()
        # An async collective's time overlaps the compute: not in `comm_s` (as all_reduce_async).
        self.comm._count(payload, (dist.get_world_size(group) - 1) * payload, "fsdp",
                         0.0 if async_op else time.perf_counter() - start)
        return work


class CountedReduceScatter(CountedAllGather):
    """FSDP2's reduce-scatter (torch's default: `dist.reduce_scatter_single`), counted into `comm`
    as "fsdp": the full gradient this rank hands in, as a ring moves (N - 1) / N of it."""

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        start = time.perf_counter()
        work = dist.reduce_scatter_single(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        payload, n = input_tensor.numel() * input_tensor.element_size(), dist.get_world_size(group)
        self.comm._count(payload, (n - 1) / n * payload, "fsdp", 0.0 if async_op else time.perf_counter() - start)
        return work


def count_fsdp(module: torch.nn.Module, comm: Comm) -> None:
    """Run the collectives of every FSDP2-sharded module in `module` (after `fully_shard`) through
    counted ones, with torch's default behaviour."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_custom_all_gather(CountedAllGather(comm))
            m.set_custom_reduce_scatter(CountedReduceScatter(comm))


def fsdp_pass_bytes(root: list[torch.Size], layers: list[list[torch.Size]], ranks: int,
                    param_bytes: int = 4, reduce_bytes: int = 4) -> dict[str, int]:
    """What one rank hands to FSDP2's collectives in one forward and backward of a model sharded as
    `sync.shard_layers` shards it over `ranks` ranks: the parameter shapes of the root module (those
    outside every layer) and of each decoder layer, all trained. FSDP2 splits each parameter along
    dim 0 into `ranks` pieces padded to ceil(rows / ranks) rows. The forward all-gathers every
    group's padded shard; the backward gathers each layer's again (it was resharded after its
    forward; the root stays gathered) and reduce-scatters every group's full padded gradient.
    `param_bytes`: the element size of the gathered weights (bf16 compute on accelerators: 2),
    `reduce_bytes`: of the reduced gradients. Returns {"all_gather": bytes, "reduce_scatter": bytes}."""
    def shard(shapes: list[torch.Size]) -> int:
        return sum(math.ceil(s[0] / ranks) * math.prod(s[1:]) for s in shapes)

    layer_shards = sum(shard(shapes) for shapes in layers)
    return {"all_gather": (shard(root) + 2 * layer_shards) * param_bytes,
            "reduce_scatter": ranks * (shard(root) + layer_shards) * reduce_bytes}
