"""Collectives that count what they send.

Every collective keel runs goes through `Comm`, which adds the payload (the tensor's bytes, as
this rank hands it to the collective) to a per-purpose counter, so a step's row can say exactly
what it sent: `comm_bytes` for the step and `comm_s` spent inside collectives. A ring all-reduce
moves about twice its payload over each rank's link (reduce-scatter, then all-gather); that wire
factor is used only to estimate time on a simulated link (`link_gbps`, `link_latency_ms`), never
for the byte counts, which the tests check against the tensors' sizes.

With one process every call returns at once and counts nothing: nothing crossed a wire.
"""

from __future__ import annotations

import time
from collections import Counter

import torch
import torch.distributed as dist

from keel.distributed.world import World


class Comm:
    def __init__(self, world: World, device: torch.device, link_gbps: float = 0.0, link_latency_ms: float = 0.0):
        self.world = world
        # gloo works on host tensors; nccl/hccl/xccl on the accelerator's own.
        self.device = device if world.size > 1 and dist.get_backend() != "gloo" else torch.device("cpu")
        self.link_bytes_per_s = link_gbps * 1e9 / 8
        self.link_latency_s = link_latency_ms / 1e3
        self.bytes: Counter = Counter()  # by purpose, since the run (re)started
        self._step_bytes = 0
        self._step_s = 0.0
        self._step_link_s = 0.0

    def _count(self, payload: int, wire: float, purpose: str, seconds: float) -> None:
        self.bytes[purpose] += payload
        self._step_bytes += payload
        self._step_s += seconds
        if self.link_bytes_per_s:
            self._step_link_s += self.link_latency_s + wire / self.link_bytes_per_s

    def all_reduce(self, t: torch.Tensor, purpose: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In place; returns `t`."""
        if self.world.size > 1:
            n = self.world.size
            start = time.perf_counter()
            dist.all_reduce(t, op=op)
            self._count(t.numel() * t.element_size(), 2 * (n - 1) / n * t.numel() * t.element_size(),
                        purpose, time.perf_counter() - start)
        return t

    def all_gather(self, t: torch.Tensor, purpose: str) -> list[torch.Tensor]:
        """Every rank's `t` (same shape on all), in rank order."""
        if self.world.size == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world.size)]
        start = time.perf_counter()
        dist.all_gather(out, t)
        payload = t.numel() * t.element_size()
        self._count(payload, (self.world.size - 1) * payload, purpose, time.perf_counter() - start)
        return out

    def broadcast(self, t: torch.Tensor, purpose: str, src: int = 0) -> torch.Tensor:
        """In place from rank `src`; returns `t`."""
        if self.world.size > 1:
            start = time.perf_counter()
            dist.broadcast(t, src=src)
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
        dist.gather_object((tensors, meta), out, dst=0)
        payload = 0 if self.world.main else sum(t.numel() * t.element_size() for t in tensors.values())
        self._count(payload, payload, purpose, time.perf_counter() - start)
        return out

    def scalar(self, value: float, purpose: str, op=dist.ReduceOp.SUM) -> float:
        return self.all_reduce(torch.tensor([float(value)], dtype=torch.float64, device=self.device), purpose, op).item()

    def barrier(self) -> None:
        if self.world.size > 1:
            dist.barrier()

    def take_step(self) -> dict:
        """This step's communication figures for its metrics row; resets the step counters."""
        row = {"comm_bytes": self._step_bytes, "comm_s": self._step_s}
        if self.link_bytes_per_s:
            row["link_s"] = self._step_link_s
        self._step_bytes, self._step_s, self._step_link_s = 0, 0.0, 0.0
        return row
