"""A run folder's logs: metrics.jsonl (one object per step, flushed; the rows also go to the run's
experiment trackers, keel/trackers.py), events.jsonl (faults, skips, restarts), and a rich progress
bar for the human watching."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from keel.io import atomic_write
from keel.trackers import Tracker, scalars

console = Console(stderr=True)


def _clean(value):
    """JSON has no NaN/inf; write them as null rather than produce an unreadable line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    def __init__(self, out: str | Path, fresh: bool = False, trackers: list[Tracker] = ()):
        """`fresh` starts the logs over; otherwise rows append (stages of one run share a folder).
        `trackers` (keel/trackers.py) get every metrics row too."""
        self.out = Path(out)
        self.trackers = list(trackers)
        self.out.mkdir(parents=True, exist_ok=True)
        mode = "w" if fresh else "a"
        self._metrics = open(self.out / "metrics.jsonl", mode)
        self._events = open(self.out / "events.jsonl", mode)

    def metrics(self, row: dict) -> None:
        self._metrics.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._metrics.flush()
        values = scalars(row)
        self._each_tracker(lambda tracker: tracker.log(values, row.get("step", 0)))

    def _each_tracker(self, call) -> None:
        """call(tracker) for each tracker. metrics.jsonl has every row, so a tracker that fails is
        dropped, with an event and a line in the terminal, rather than stop the run."""
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as e:
                self.trackers.remove(tracker)
                error = f"{type(e).__name__}: {e}"
                self.event("tracker_failed", tracker=type(tracker).__name__, error=error)
                console.print(f"{type(tracker).__name__} failed ({error}); it gets no more rows",
                              style="yellow", highlight=False, markup=False)

    def truncate(self, stage: str, step: int) -> None:
        """Forget `stage`'s rows after `step` (a resumed or rolled-back run writes them again).
        A torn last line from a killed process is dropped too."""
        self._metrics.close()
        path = self.out / "metrics.jsonl"
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("stage") != stage or row.get("step", 0) <= step:
                keep.append(line + "\n")
        atomic_write(path, "".join(keep))
        self._metrics = open(path, "a")
        self._each_tracker(lambda tracker: tracker.rewind(step))

    def event(self, kind: str, **fields) -> None:
        """Record an event; the ones in SHOWN also get a line in the terminal as they happen."""
        self._events.write(json.dumps({"time": time.time(), "event": kind, **fields}) + "\n")
        self._events.flush()
        if kind in SHOWN:
            console.print(describe(kind, fields), style="yellow", highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        self._each_tracker(lambda tracker: tracker.close())
        self._metrics.close()
        self._events.close()


# Events a person watching a run should see when they happen (without them a progress bar just
# jumps back after a rollback or a restart); events.jsonl has them all.
SHOWN = {
    "fault_injected": "fault injected: {fault}",
    "skip": "{stage} step {step} skipped, no update ({reason})",
    "spike": "{stage} step {step}: {problem}",
    "rollback": "{stage}: rolled back to the checkpoint of step {step}; the batch that spiked will be skipped",
    "resume": "{stage}: resumed from the checkpoint of step {step}",
    "restart": "restart {attempt} of {max_restarts} (the run exited with {exit_code}): resuming from the newest checkpoint",
    "corrupt_checkpoint": "checkpoint {path} is bad ({problem}): trying an older one",
    "hang": "no progress for {seconds:.0f}s: thread stacks in {stacks}, exiting",
}


def describe(kind: str, fields: dict) -> str:
    """The terminal line of an event in SHOWN."""
    try:
        return SHOWN[kind].format(**fields)
    except (KeyError, ValueError):  # a field missing: still say what happened
        return f"{kind}: {fields}"


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_live: Progress | None = None  # rich allows one live display: nested bars join the outer one


@contextmanager
def phases(description: str, total: int):
    """Progress through the `total` phases of a long job whose steps report nothing themselves (an
    ONNX export: load, trace, check); yields `begin(name)`, called as each phase starts. A bar with
    the current phase on a terminal; elsewhere a line as each phase starts."""
    start = time.time()
    with progress(description, total, lines=False) as advance:
        begun = 0

        def begin(name: str) -> None:
            nonlocal begun
            if begun:
                advance()
            begun += 1
            advance(0, now=name)
            if not console.is_terminal:
                console.print(f"{description}: {name} ({begun}/{total}, {time.time() - start:.0f}s so far)",
                              highlight=False, markup=False, soft_wrap=True)

        yield begin
        advance(total - max(0, begun - 1))  # the last phase, and any the job skipped
        if not console.is_terminal:
            console.print(f"{description}: done in {time.time() - start:.0f}s", highlight=False)


@contextmanager
def progress(description: str, total: int, enabled: bool = True, lines: bool = True):
    """A progress bar; yields `advance(n=1, **fields)` where fields show up beside the bar. Off a
    terminal (CI, nohup, a pipe) it prints a plain line every tenth of the way instead (unless not
    `lines`: the caller prints its own). Not `enabled` (ranks other than 0), it shows nothing."""
    global _live
    if not enabled:
        yield lambda n=1, **fields: None
        return
    tty = console.is_terminal
    outer = _live is None
    if outer:
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        _live = Progress(*columns, console=console, disable=not tty)
        _live.start()
    bar = _live
    task = bar.add_task(description, total=total, info="")
    done, start, next_line = 0, time.time(), max(1, total // 10)

    def advance(n: int = 1, **fields):
        nonlocal done, next_line
        done += n
        info = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        bar.update(task, advance=n, info=info)
        if lines and not tty and outer and (done >= next_line or done == total):
            next_line += max(1, total // 10)
            console.print(f"{description}: {done}/{total} {time.time() - start:.0f}s {info}", highlight=False)

    try:
        yield advance
    finally:
        if outer:
            bar.stop()
            _live = None
        else:
            bar.remove_task(task)
