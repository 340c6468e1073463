"""Guarded steps: skip non-finite updates, detect loss/grad-norm spikes, catch hangs."""

from __future__ import annotations

import faulthandler
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch


def guarded_update(model, optimizer, backward: Callable[[float], float], grad_clip: float, injector, step: int,
                   sync) -> tuple[float, float, bool]:
    """Accumulate gradients with `backward(loss_scale)` (it runs the backward of every micro-batch,
    each loss multiplied by `loss_scale`, and returns the step's loss), average them over ranks
    (`sync.grads`: DDP), clip, and step unless the loss or the gradient is non-finite (then the
    update is skipped and the gradients dropped). A non-finite gradient on one rank reaches every
    rank through the average, so all ranks skip together. Returns (loss, grad_norm, applied)."""
    optimizer.zero_grad(set_to_none=True)
    loss = backward(injector.loss_scale(step))
    injector.before_update(step, model)
    sync.grads()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, False
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free a model's worth of memory before the next rollout
    return loss, grad_norm, True


class SpikeDetector:
    """Flags a value more than `zscore` standard deviations above the mean of the last `window`
    accepted values. Off when zscore is 0. Its window is part of the checkpoint."""

    def __init__(self, zscore: float = 0.0, window: int = 20, keys=("loss", "grad_norm")):
        self.zscore, self.window, self.keys = zscore, window, keys
        self.history: dict[str, list[float]] = {k: [] for k in keys}

    def is_spike(self, row: dict) -> str | None:
        if not self.zscore:
            return None
        for key in self.keys:
            value, past = row.get(key), self.history[key]
            if value is None or len(past) < self.window // 2:
                continue
            mean = sum(past) / len(past)
            std = math.sqrt(sum((v - mean) ** 2 for v in past) / len(past))
            # Above only: a loss falling faster than its window (early SFT does) is progress, and
            # rolling it back would replay the same fall, and roll back again, without end.
            if value - mean > self.zscore * max(std, 1e-8 + 1e-3 * abs(mean)):
                return f"{key} {value:.4g} vs mean {mean:.4g} ± {std:.3g}"
        return None

    def accept(self, row: dict) -> None:
        for key in self.keys:
            value = row.get(key)
            if value is not None and math.isfinite(value):
                self.history[key] = (self.history[key] + [value])[-self.window:]


class Watchdog:
    """A step that takes longer than `seconds` dumps every thread's stack into the run folder and
    exits with status 3, so a supervisor (keel's --max-restarts, torchrun) restarts the run."""

    EXIT_CODE = 3

    def __init__(self, seconds: float, out: Path, log):
        self.seconds, self.out, self.log = seconds, Path(out), log
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        if seconds:
            self._thread.start()

    def beat(self) -> None:
        self._beat = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.seconds / 4)):
            stalled = time.monotonic() - self._beat
            if stalled > self.seconds:
                path = self.out / f"hang-{int(time.time())}.txt"
                with open(path, "w") as f:
                    f.write(f"no step finished for {stalled:.1f}s (limit {self.seconds}s); stacks of every thread:\n")
                    f.flush()
                    faulthandler.dump_traceback(file=f, all_threads=True)
                self.log.event("hang", seconds=stalled, stacks=str(path))
                os._exit(self.EXIT_CODE)

    def stop(self) -> None:
        self._stop.set()
