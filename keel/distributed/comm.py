"""Collectives that count what they send.

Every collective keel runs goes through `Comm`, which adds the payload (the tensor's bytes, as
this rank hands it to the collective) to a per-purpose counter, so a step's row can say exactly
what it sent: `comm_bytes` for the step and `comm_s` spent inside collectives. A ring all-reduce
moves about twice its payload over each rank's link (reduce-scatter, then all-gather); that wire
factor is used only to estimate time on a simulated link (`link_gbps`, `link_latency_ms`), never
for the byte counts, which the tests check against the tensors' sizes.

With one process every call returns at once and counts nothing: nothing crossed a wire.
`Comm.sub(group)` runs the same collectives within a subgroup of the ranks (DiLoCo over FSDP: the
ranks of one shard group, or the ranks holding the same shard in every group) and counts into the
same tallies, so a step's `comm_bytes` holds everything this rank sent.
"""

from __future__ import annotations

import copy
import time
from collections import Counter

import torch
import torch.distributed as dist

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

    def sub(self, group: dist.ProcessGroup) -> Comm:
        """The same collectives within `group` (a subset of the ranks; ranks and sources numbered
        within it), counted into this Comm's tallies."""
        view = copy.copy(self)  # shares `bytes` and `_step`
        view.group, view.world = group, World(dist.get_rank(group), dist.get_world_size(group))
        return view

    def _count(self, payload: int, wire: float, purpose: str, seconds: float) -> None:
        self.bytes[purpose] += payload
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
        """This step's communication figures for its metrics row; resets the step counters."""
        row = {"comm_bytes": self._step["bytes"], "comm_s": self._step["s"]}
        if self.link_bytes_per_s:
            row["link_s"] = self._step["link_s"]
        self._step.update(bytes=0, s=0.0, link_s=0.0)
        return row
