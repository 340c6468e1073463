"""How much of a run's wall time went into useful steps, and how often to checkpoint.

Useful time is the step time of the steps that survived into metrics.jsonl; checkpointing is the
time the loop was blocked writing checkpoints; the rest of the wall time was lost to faults
(recomputed steps, restarts, start-up). The recommended interval is the Young/Daly optimum
sqrt(2 * MTBF * C), with C the measured blocking cost of one checkpoint.

Distributed runs add what rank 0 sent (`comm_bytes`), the time it spent in collectives, and with
a simulated link (`--simulate-link`) the wall time the run would have taken on it: measured wall
time, minus the time in collectives here, plus the time those bytes take on the simulated link.
"""

from __future__ import annotations

import math
from pathlib import Path

from keel.runlog import read_jsonl

FAULTS = ("restart", "rollback", "hang", "corrupt_checkpoint")


def goodput(out: str | Path, mtbf_hours: float | None = None) -> dict:
    out = Path(out)
    events, rows = read_jsonl(out / "events.jsonl"), read_jsonl(out / "metrics.jsonl")
    times = [e["time"] for e in events if "time" in e]
    wall = (max(times) - min(times)) if times else 0.0
    useful = sum(r.get("step_s") or 0.0 for r in rows if not r.get("skipped"))
    blocking = [e["seconds"] for e in events if e["event"] == "checkpoint_blocking"]
    checkpointing = sum(blocking)
    faults = {kind: sum(e["event"] == kind for e in events) for kind in FAULTS}
    n_faults = faults["restart"] + faults["rollback"]
    observed_mtbf = wall / n_faults if n_faults else None
    mtbf_s = mtbf_hours * 3600 if mtbf_hours else observed_mtbf
    cost = sum(blocking) / len(blocking) if blocking else None
    step_s = useful / max(1, sum(1 for r in rows if r.get("step_s")))
    interval_s = math.sqrt(2 * mtbf_s * cost) if mtbf_s and cost else None
    comm_s = sum(r.get("comm_s") or 0.0 for r in rows)
    link_s = sum(r.get("link_s") or 0.0 for r in rows) if any("link_s" in r for r in rows) else None
    return {
        "comm_bytes": sum(r.get("comm_bytes") or 0 for r in rows), "comm_s": comm_s,
        "simulated_wall_s": None if link_s is None else wall - comm_s + link_s,
        "wall_s": wall, "useful_s": useful, "checkpoint_s": checkpointing,
        "lost_s": max(0.0, wall - useful - checkpointing),
        "goodput": useful / wall if wall else None,
        "useful_steps": sum(1 for r in rows if not r.get("skipped")),
        "skipped_steps": sum(1 for r in rows if r.get("skipped")),
        "faults": faults, "mtbf_s": mtbf_s, "mtbf_observed": mtbf_hours is None and observed_mtbf is not None,
        "checkpoint_cost_s": cost, "mean_step_s": step_s,
        "recommended_interval_s": interval_s,
        "recommended_interval_steps": max(1, round(interval_s / step_s)) if interval_s and step_s else None,
    }
