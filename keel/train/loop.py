"""The training loop SFT and RL share, with what unstable hardware needs around a step.

A trainer (the `Trainer` protocol below: SFTTrainer, RLTrainer) takes one step at a time and can
save and restore its state; this loop adds resume from the newest good checkpoint, periodic atomic
checkpoints, spike rollback, the hang watchdog and fault injection. Everything the loop itself
decides on (the spike window, the batches to skip) is part of the checkpoint, so a resumed run
takes the same path as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Protocol

import torch

from keel.config import ResilienceConfig
from keel.distributed import FSDP, Sync
from keel.distributed.sync import ShardedDiLoCo
from keel.distributed.world import elastic_restart
from keel.errors import KeelError
from keel.resilience.checkpoint import Checkpointer, folder_name, load_shards, read, shard_group
from keel.resilience.faults import Injector
from keel.resilience.guard import SpikeDetector, Watchdog
from keel.resilience.ranks import gather_state, rank_state, restarted_parts, saved_world_size
from keel.resilience.state import load_sharded_state, sharded_state
from keel.runlog import RunLog, progress, read_jsonl
from keel.trackers import open_trackers

# Fields that measure the machine, not the run; they differ between a resumed run and an
# uninterrupted one and are left out of exactness comparisons.
TIMING_KEYS = {"tokens_per_s", "step_s", "rollout_s", "weight_sync_s", "peak_rss_mb", "peak_device_mb"}
MB = 1e6  # memory figures in MB, as `keel report` shows every size


class Trainer(Protocol):
    """What the loop asks of a trainer."""

    step_idx: int  # steps taken; the loop runs until it reaches the stage's total
    device: torch.device  # where its steps compute: the loop logs that device's peak memory per step
    sync: Sync     # how ranks keep in step (a single process too): the loop's collectives go through it
    cfg: object    # the stage's config; its report_to trackers get the metrics rows and the config itself
    model: torch.nn.Module              # under sync: fsdp the loop checkpoints these two itself, sharded
    optimizer: torch.optim.Optimizer

    def step(self, injector: Injector, apply: bool = True) -> dict:
        """Take step `step_idx + 1` and return its metrics row; with apply=False draw the step's
        data (keeping every stream where an applied step leaves it) without learning from it."""
        ...

    def state(self) -> tuple[dict, dict]:
        """(tensor groups, JSON-able meta): everything needed to continue exactly."""
        ...

    def load_state(self, tensors: dict, meta: dict) -> None:
        """Restore what `state` returned."""
        ...


def reset_peak_memory(device: torch.device) -> None:
    """Start a step's count of the accelerator's peak memory (a CPU has no per-step count)."""
    if device.type != "cpu":
        with contextlib.suppress(RuntimeError, NotImplementedError):  # an allocator that keeps no stats
            torch.accelerator.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """The metrics row's memory figures, MB: `peak_rss_mb`, this process's peak resident set since
    it started (a high-water mark: it never falls, so a step shows the most any step so far needed
    of the host, loading included); on an accelerator also `peak_device_mb`, the most its tensors
    took during this step (`reset_peak_memory` before it)."""
    try:  # Linux: VmHWM, not ru_maxrss, which carries a forking parent's peak into its children
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
        rss = int(hwm.split()[1]) * 1024
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    row = {"peak_rss_mb": rss / MB}
    if device.type != "cpu":
        with contextlib.suppress(RuntimeError, NotImplementedError):  # an allocator that keeps no stats
            row["peak_device_mb"] = torch.accelerator.max_memory_allocated(device) / MB
    return row


def fired_faults(out: Path) -> set[str]:
    return {e["fault"] for e in read_jsonl(Path(out) / "events.jsonl") if e.get("event") == "fault_injected"}


def sharded_checkpoints(sync: Sync) -> bool:
    """Whether the run's checkpoints hold the model and optimizer as each rank's shards (DCP):
    under sync: fsdp, where they are the same model on every rank (one process included, so that
    a run can resume on more ranks), and under DiLoCo over FSDP, one model per group of ranks
    (`sync.checkpoint_shards` keys them apart)."""
    return isinstance(sync, (FSDP, ShardedDiLoCo))


def train_loop(trainer: Trainer, out: str | Path, res: ResilienceConfig, total: int, stage: str,
               after_step=None) -> list[dict]:
    """Train until `trainer.step_idx == total`. Under torchrun every rank runs this loop; rank 0
    writes the metrics, the checkpoints (with every rank's own state gathered in; under sync: fsdp
    each rank adds its own shards of the model and optimizer) and the progress bar, and runs
    `after_step` (evaluation); rank r keeps its events in OUT/rank<r>/."""
    out = Path(out)
    sync = trainer.sync
    world = sync.world
    log = RunLog(out if world.main else out / f"rank{world.rank}",
                 trackers=open_trackers(trainer.cfg, out, stage) if world.main else [])
    sharded = sharded_checkpoints(sync)
    device = getattr(trainer, "device", torch.device("cpu"))
    ckpt = Checkpointer(out / "checkpoints", log, res.checkpoint_every, res.checkpoint_seconds, res.keep,
                        res.async_checkpoint, main=world.main, group=shard_group() if sharded else None)
    injector = Injector(res.inject or os.environ.get("KEEL_FAULTS", ""), log, fired_faults(log.out), world.rank)
    ckpt.on_saved = injector.after_checkpoint
    spikes = SpikeDetector(res.spike_zscore, res.spike_window)
    skip: set[int] = set()
    rows: list[dict] = []

    def restore(reason: str) -> bool:
        # Rank 0 picks the checkpoint (it may have one still being written), the others follow.
        ckpt.wait()
        found = ckpt.latest_path() if world.main else None
        choice = torch.tensor([-1 if found is None else int(found.name)], device=sync.comm.device)
        step = int(sync.comm.broadcast(choice, "control").item())
        if step < 0:
            return False
        path = ckpt.folder / folder_name(step)
        tensors, state = read(path)
        sync.check_resume(state["trainer"].get("sync", {}))
        fresh = None
        if "sharded" in state:
            if not sharded:
                raise KeelError(f"{path} holds sharded model and optimizer state (written under sync: fsdp): resume "
                                "with sync: fsdp, or start a fresh run", field="distributed.sync")
            fresh = restore_shards(path, state["sharded"])
            tensors |= {g: t for g, t in fresh[0].items() if g not in sync.rank_local}  # now the checkpoint's
            state["trainer"]["optimizer"] = fresh[1]["optimizer"]
        saved = saved_world_size(state["trainer"])
        tensors, meta = rank_state(tensors, state["trainer"], sync.rank_local, world.rank, world.size, fresh)
        if saved != world.size:
            log.event("reshard", stage=stage, step=step, saved_world_size=saved, world_size=world.size,
                      restarted=restarted_parts(sync.rank_local, world.rank, saved))
        trainer.load_state(tensors, meta)
        sync.load_state(tensors.get("sync", {}), meta.get("sync", {}))
        spikes.history = state["spikes"]
        # A union, not the checkpoint's set: two spikes after one checkpoint would otherwise each
        # forget the other's skip on rollback and take turns spiking for ever.
        skip.update(state["skip"])
        del rows[sum(1 for row in rows if row["step"] <= trainer.step_idx):]  # they will be taken again
        log.truncate(stage, trainer.step_idx)
        log.event(reason, stage=stage, step=trainer.step_idx)
        return True

    def restore_shards(path: Path, saved: dict) -> tuple[dict, dict]:
        """Every rank loads its shards of a sharded checkpoint (DCP reshards them onto this run's
        ranks) into the model, optimizer and the other parts that are the same on every rank; returns
        the trainer's state as it now is, for `trainer.load_state` to take back unchanged, with this
        run's fresh rank-local parts (what restarts from the seed on another number of ranks)."""
        tensors, _ = live_state()
        targets, _ = sharded_state(trainer.model, trainer.optimizer, with_optimizer=saved["optimizer"]["param_groups"]
                                   is not None)
        targets |= {g: t for g, t in tensors.items() if g not in sync.rank_local and g not in targets}
        load_shards(path, sync.checkpoint_shards(targets), ckpt.group)
        load_sharded_state(trainer.model, trainer.optimizer, targets, saved["optimizer"])
        return live_state()

    def live_state() -> tuple[dict, dict]:
        tensors, meta = trainer.state()
        sync_tensors, sync_meta = sync.state()
        return {**tensors, "sync": sync_tensors}, {**meta, "sync": sync_meta}

    def save() -> None:
        tensors, meta = live_state()
        shards, extra = None, {}
        if sharded:  # every rank writes its own shards; what differs between ranks is gathered as below
            shards, optimizer_meta = sharded_state(trainer.model, trainer.optimizer)
            shards |= {g: t for g, t in tensors.items() if g not in sync.rank_local and g not in shards}
            shards = sync.checkpoint_shards(shards)
            tensors = {g: t for g, t in tensors.items() if g in sync.rank_local}
            meta = {k: v for k, v in meta.items() if k != "optimizer"}
            extra = {"sharded": {"optimizer": optimizer_meta}}
        gathered = gather_state(tensors, meta, sync.rank_local, sync.comm)
        if gathered is not None:
            tensors, meta = gathered
            ckpt.save(trainer.step_idx, tensors,
                      {"trainer": meta, "spikes": spikes.history, "skip": sorted(skip), **extra}, shards)
        elif sharded:
            ckpt.save(trainer.step_idx, None, None, shards)

    log.event("run_start", stage=stage, pid=os.getpid(), rank=world.rank, world_size=world.size)
    if not ((res.resume or elastic_restart()) and restore("resume")):
        # A fresh start: forget this stage's rows and checkpoints from any earlier attempt, so a
        # later --resume cannot pick up a stale one.
        log.truncate(stage, 0)
        if world.main:
            shutil.rmtree(ckpt.folder, ignore_errors=True)
        sync.comm.barrier()
    sync.comm.take_step()  # start-up traffic (the weight broadcast, the resume choice) is no step's
    watchdog = Watchdog(res.hang_seconds, log.out, log)
    try:
        with progress(stage, total, enabled=world.main) as advance:
            advance(trainer.step_idx)
            while trainer.step_idx < total:
                step = trainer.step_idx + 1
                reset_peak_memory(device)
                if step in skip:  # the batch that caused a spike: draw it, do not learn from it
                    row = trainer.step(injector, apply=False)
                    row["skipped"] = "spike"
                else:
                    row = trainer.step(injector)
                row.update(peak_memory(device))
                row = sync.finish(row, trainer.step_idx, final=trainer.step_idx == total)
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
                if after_step and world.main:
                    after_step(row)
                if row.get("skipped"):
                    log.event("skip", stage=stage, step=step, reason=row["skipped"])
                if world.main:
                    log.metrics(row)
                rows.append(row)
                advance(**{k: row[k] for k in ("loss", "reward") if isinstance(row.get(k), float)})
                due = ckpt.due(trainer.step_idx)
                if res.checkpoint_seconds:  # a time-based checkpoint is due when rank 0's clock says so
                    due = sync.agree(due)
                if due and trainer.step_idx < total:
                    save()
            if ckpt.due(trainer.step_idx, final=True):
                save()
            ckpt.wait()
    finally:
        watchdog.stop()
        log.event("run_end", stage=stage, step=trainer.step_idx)
        log.close()
    return rows
