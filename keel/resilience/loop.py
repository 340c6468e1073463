"""The resilient training loop shared by SFT and RL.

A trainer exposes `step_idx`, `step(injector) -> metrics row`, `state() -> (tensors, json)` and
`load_state(tensors, json)`. This loop adds what unstable hardware needs around it: resume from
the newest good checkpoint, periodic atomic checkpoints, spike rollback, the hang watchdog, and
fault injection. Everything the loop itself decides on (the spike window, the batches to skip)
is part of the checkpoint, so a resumed run takes the same path as an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from keel.config import ResilienceConfig
from keel.resilience.checkpoint import Checkpointer
from keel.resilience.faults import Injector
from keel.resilience.guard import SpikeDetector, Watchdog
from keel.runlog import RunLog, progress, read_jsonl

# Fields that measure the machine, not the run; they differ between a resumed run and an
# uninterrupted one and are left out of exactness comparisons.
TIMING_KEYS = {"tokens_per_s", "step_s", "rollout_s"}


def fired_faults(out: Path) -> set[str]:
    return {e["fault"] for e in read_jsonl(Path(out) / "events.jsonl") if e.get("event") == "fault_injected"}


def run(trainer, out: str | Path, res: ResilienceConfig, total: int, stage: str, after_step=None) -> list[dict]:
    out = Path(out)
    log = RunLog(out)
    ckpt = Checkpointer(out / "checkpoints", log, res.checkpoint_every, res.checkpoint_seconds, res.keep,
                        res.async_checkpoint)
    injector = Injector(res.inject or os.environ.get("KEEL_FAULTS", ""), log, fired_faults(out))
    ckpt.on_saved = injector.after_checkpoint
    spikes = SpikeDetector(res.spike_zscore, res.spike_window)
    skip: set[int] = set()

    def restore(reason: str) -> bool:
        found = ckpt.latest()
        if found is None:
            return False
        tensors, state = found
        trainer.load_state(tensors, state["trainer"])
        spikes.history = state["spikes"]
        skip.clear()
        skip.update(state["skip"])
        log.truncate(stage, trainer.step_idx)
        log.event(reason, stage=stage, step=trainer.step_idx)
        return True

    def save() -> None:
        tensors, state = trainer.state()
        ckpt.save(trainer.step_idx, tensors, {"trainer": state, "spikes": spikes.history, "skip": sorted(skip)})

    log.event("run_start", stage=stage, pid=os.getpid())
    if not (res.resume and restore("resume")):
        # A fresh start: forget this stage's rows and checkpoints from any earlier attempt, so a
        # later --resume cannot pick up a stale one.
        log.truncate(stage, 0)
        shutil.rmtree(ckpt.folder, ignore_errors=True)
    watchdog = Watchdog(res.hang_seconds, out, log)
    rows = []
    try:
        with progress(stage, total) as advance:
            advance(trainer.step_idx)
            while trainer.step_idx < total:
                step = trainer.step_idx + 1
                if step in skip:  # the batch that caused a spike: draw it, do not learn from it
                    row = trainer.step(injector, apply=False)
                    row["skipped"] = "spike"
                else:
                    row = trainer.step(injector)
                watchdog.beat()
                if step not in skip:
                    problem = spikes.is_spike(row)
                    if problem:
                        log.event("spike", stage=stage, step=step, problem=problem)
                        if restore("rollback"):
                            skip.add(step)
                            advance(trainer.step_idx - step)
                            continue
                    spikes.accept(row)
                if after_step:
                    after_step(row)
                if row.get("skipped"):
                    log.event("skip", stage=stage, step=step, reason=row["skipped"])
                log.metrics(row)
                rows.append(row)
                advance(**{k: row[k] for k in ("loss", "reward") if isinstance(row.get(k), float)})
                if ckpt.due(trainer.step_idx) and trainer.step_idx < total:
                    save()
            if ckpt.due(trainer.step_idx, final=True):
                save()
            ckpt.wait()
    finally:
        watchdog.stop()
        log.event("run_end", stage=stage, step=trainer.step_idx)
        log.close()
    return rows
