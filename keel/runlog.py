"""A run folder's logs: metrics.jsonl (one object per step, flushed), events.jsonl (faults, skips,
restarts), and a rich progress bar for the human watching."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from keel.io import atomic_write

console = Console(stderr=True)


def _clean(value):
    """JSON has no NaN/inf; write them as null rather than produce an unreadable line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    def __init__(self, out: str | Path, fresh: bool = False):
        """`fresh` starts the logs over; otherwise rows append (stages of one run share a folder)."""
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        mode = "w" if fresh else "a"
        self._metrics = open(self.out / "metrics.jsonl", mode)
        self._events = open(self.out / "events.jsonl", mode)

    def metrics(self, row: dict) -> None:
        self._metrics.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._metrics.flush()

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

    def event(self, kind: str, **fields) -> None:
        self._events.write(json.dumps({"time": time.time(), "event": kind, **fields}) + "\n")
        self._events.flush()

    def close(self) -> None:
        self._metrics.close()
        self._events.close()


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_live: Progress | None = None  # rich allows one live display: nested bars join the outer one


@contextmanager
def progress(description: str, total: int, enabled: bool = True):
    """A progress bar; yields `advance(n=1, **fields)` where fields show up beside the bar. Off a
    terminal (CI, nohup, a pipe) it prints a plain line every tenth of the way instead. Not
    `enabled` (ranks other than 0), it shows nothing."""
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
        if not tty and outer and (done >= next_line or done == total):
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
