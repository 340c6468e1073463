"""Sampling the next step's rollouts while the trainer learns from this step's (RLConfig.async_steps 1).

One worker thread runs the sampler while the caller's thread runs the forward, backward and
optimizer step; torch and ONNX Runtime release the GIL inside their kernels, so the two overlap
on the CPU's cores (or the sampler runs on another device and its thread only drives it). What
overlaps is fixed by the program, not by timing: the worker samples with the weights the sampler
held when it started, and the trainer joins it before the sampler gets new ones, so a run is the
same whatever the threads' speeds. Only the worker touches the sampler, its generator and the
prompt stream while it runs.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch


def split_threads(total: int) -> tuple[int, int]:
    """(trainer threads, sampler threads) out of `total` intra-op threads, so that the two sides
    together do not ask for more cores than the process has: oversubscribed OpenMP teams wait on
    each other's preempted threads. The sampler's side gets the smaller half (it decodes small
    batches, which do not scale across threads as the training matmuls do); each side at least 1."""
    sampler = max(1, total // 2)
    return max(1, total - sampler), sampler


class Overlap:
    """Runs one call at a time in a worker thread: `start` it, do other work, then `join`. Between
    the two the caller's thread runs with its share of the threads (`split_threads`), and gets its
    own count back at `join`."""

    def __init__(self):
        self.pool: ThreadPoolExecutor | None = None
        self.running: Future | None = None
        self.caller_threads = 0
        self.waited_s = 0.0  # how long the last `join` blocked the caller

    def start(self, fn: Callable[[], object]) -> None:
        assert self.running is None, "join the running call first"
        self.caller_threads = torch.get_num_threads()
        mine, worker = split_threads(self.caller_threads)
        if self.pool is None:  # under OpenMP the thread count is per thread: the worker sets its own once
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="keel-sampler",
                                           initializer=torch.set_num_threads, initargs=(worker,))
        torch.set_num_threads(mine)
        self.running = self.pool.submit(fn)

    def join(self):
        """The call's result (its exception, raised here)."""
        running, self.running = self.running, None
        t0 = time.perf_counter()
        try:
            return running.result()
        finally:
            self.waited_s = time.perf_counter() - t0
            torch.set_num_threads(self.caller_threads)
