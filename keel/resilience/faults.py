"""Fault injection through the real code paths: `kill@step=7,nan_grad@step=3,corrupt@latest,hang@step=9`.

Each fault fires once per run folder: firing is recorded in events.jsonl before the fault acts,
so a restarted run does not kill itself again at the same step. Under torchrun a fault acts on
every rank unless it names one: `kill@step=7@rank=1` kills rank 1 only.

  kill@step=N      SIGKILL this process in the middle of step N (after backward, before the update)
  nan_grad@step=N  fill the gradients of step N with NaN
  spike@step=N     scale the loss (and so the gradients) of step N by 1e4
  hang@step=N      block step N forever (the hang watchdog must catch it)
  corrupt@latest   flip bytes in the next checkpoint written
  corrupt@step=N   flip bytes in the checkpoint of step N when it is written
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch

from keel.errors import KeelError
from keel.resilience.checkpoint import step_of

KINDS = ("kill", "nan_grad", "spike", "hang", "corrupt")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int | None  # None: "latest" (the next checkpoint)
    rank: int | None = None  # None: every rank

    @property
    def key(self) -> str:
        where = "latest" if self.step is None else f"step={self.step}"
        return f"{self.kind}@{where}" + ("" if self.rank is None else f"@rank={self.rank}")


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        kind, _, where = item.partition("@")
        if kind not in KINDS:
            raise KeelError(f"unknown fault {kind!r} in {spec!r}: use {', '.join(KINDS)}")
        where, _, rank = where.partition("@")
        if rank and not (rank.startswith("rank=") and rank[5:].isdigit()):
            raise KeelError(f"fault {item!r}: name a rank as {kind}@{where}@rank=R")
        rank = int(rank[5:]) if rank else None
        if kind == "corrupt" and where == "latest":
            faults.append(Fault(kind, None, rank))
            continue
        key, _, value = where.partition("=")
        if key != "step" or not value.isdigit():
            raise KeelError(f"fault {item!r} must look like {kind}@step=N" + (" or corrupt@latest" if kind == "corrupt" else ""))
        faults.append(Fault(kind, int(value), rank))
    return faults


class Injector:
    """Holds this rank's faults still to fire; the training loop asks it at the points where faults act."""

    def __init__(self, spec: str, log, fired: set[str] = frozenset(), rank: int = 0):
        self.log = log
        self.pending = [f for f in parse(spec) if f.key not in fired and f.rank in (None, rank)]

    def _take(self, kind: str, step: int | None) -> bool:
        for f in self.pending:
            if f.kind == kind and f.step == step:
                self.pending.remove(f)
                self.log.event("fault_injected", fault=f.key)
                return True
        return False

    def before_update(self, step: int, model: torch.nn.Module) -> None:
        """Called after backward, before the optimizer step."""
        if self._take("nan_grad", step):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        if self._take("hang", step):
            while True:  # the watchdog ends this process
                time.sleep(3600)
        if self._take("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)

    def loss_scale(self, step: int) -> float:
        return 1e4 if self._take("spike", step) else 1.0

    def after_checkpoint(self, path) -> None:
        if self._take("corrupt", None) or self._take("corrupt", step_of(path)):
            target = path / "tensors.safetensors"
            with open(target, "r+b") as f:
                f.seek(max(0, target.stat().st_size // 2))
                f.write(b"\xde\xad\xbe\xef" * 4)


NO_FAULTS = Injector("", log=None)
