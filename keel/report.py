"""Plots and run reports: PNGs for people, JSON for machines; and a run's goodput.

Goodput: how much of a run's wall time went into useful steps, and how often to checkpoint.
Useful time is the step time of the steps that survived into metrics.jsonl; checkpointing is the
time the loop was blocked writing checkpoints; the rest of the wall time was lost to faults
(recomputed steps, restarts, start-up). The recommended interval is the Young/Daly optimum
sqrt(2 * MTBF * C), with C the measured blocking cost of one checkpoint.

Distributed runs add what rank 0 sent (`comm_bytes`), the time it spent in collectives, and with
a simulated link (`--simulate-link`) the wall time the run would have taken on it: measured wall
time, minus the time in collectives here, plus the time those bytes take on the simulated link.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from keel.errors import KeelError
from keel.io import atomic_path, atomic_write  # noqa: E402
from keel.runlog import read_jsonl  # noqa: E402

# (file name, title, metric keys to draw on the same axes)
RL_PLOTS = [
    ("reward.png", "reward per step", ["reward", "reward_correct", "reward_format"]),
    ("accuracy.png", "accuracy per step", ["accuracy", "test_pass@1"]),
    ("length.png", "response length (tokens)", ["response_length"]),
    ("kl.png", "KL to the reference (k3)", ["kl"]),
]


def _smooth(values, window: int):
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def plot(rows: list[dict], keys: list[str], title: str, path: Path, smooth: int = 1) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not pts:
            continue
        steps, values = zip(*pts)
        if smooth > 1 and len(values) > 3 * smooth:  # sparse series (periodic evals) stay raw
            ax.plot(steps, values, alpha=0.25)
            ax.plot(steps, _smooth(values, smooth), label=key, color=ax.lines[-1].get_color())
        else:
            ax.plot(steps, values, label=key, marker="o" if len(values) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write a PNG atomically and free the figure."""
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:  # the temporary name keeps .png: savefig picks the format by it
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return path


def plot_run(rl_rows: list[dict], sft_rows: list[dict], out: Path) -> list[Path]:
    paths = []
    if sft_rows:
        paths.append(plot(sft_rows, ["loss"], "SFT loss (completion tokens)", out / "sft_loss.png", smooth=5))
    for name, title, keys in RL_PLOTS:
        if rl_rows:
            paths.append(plot(rl_rows, keys, title, out / name, smooth=5))
    return paths


def write_json(data: dict, path: Path) -> None:
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def write_markdown(report: dict, plots: list[Path], path: Path) -> None:
    sft, rl = report["sft"], report["rl"]
    k = next((key for key in rl if key.startswith("pass@") and key != "pass@1"), None)
    lines = [
        "# keel demo report", "",
        f"Task: `{report['task']}` {report.get('task_options', {})}; model: {report['model']}.",
        f"Wall time: {report['wall_s'] / 60:.1f} min on {report['device']}.", "",
        "| stage | pass@1 (greedy) | " + (f"{k} | " if k else "") + "format |",
        "|---|---|" + ("---|" if k else "") + "---|",
    ]
    for name, r in (("base", report.get("base")), ("after SFT", sft), ("after RL", rl)):
        if r:
            lines.append(f"| {name} | {r['pass@1']:.3f} | " + (f"{r.get(k, float('nan')):.3f} | " if k else "")
                         + f"{r['format']:.3f} |")
    gain = rl["pass@1"] - sft["pass@1"]
    lines += ["", f"RL changed test pass@1 by **{gain * 100:+.1f} points** over the SFT model.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## Sample outputs after RL", ""]
    for ex in rl.get("examples", []):
        lines.append(f"- `{ex['question']}` (answer {ex['answer']}): `{ex['output']}`")
    atomic_write(path, "\n".join(lines) + "\n")


FAULTS = ("restart", "rollback", "hang", "corrupt_checkpoint")


def goodput(out: str | Path, mtbf_hours: float | None = None) -> dict:
    """The goodput of the run folder `out` (see the module docstring); `mtbf_hours` overrides
    the mean time between failures observed in its events."""
    out = Path(out)
    if not (out / "events.jsonl").is_file():
        raise KeelError(f"{out} has no events.jsonl: pass the out folder of a keel run", field="out")
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


def format_goodput(g: dict) -> list[str]:
    """The lines `keel report` prints for a `goodput` result, for people."""
    fmt = lambda v, unit="s": "n/a" if v is None else f"{v:.1f}{unit}"  # noqa: E731
    lines = [f"wall {fmt(g['wall_s'])}  useful {fmt(g['useful_s'])}  checkpointing {fmt(g['checkpoint_s'])}  "
             f"lost to faults {fmt(g['lost_s'])}  goodput {fmt(g['goodput'] and 100 * g['goodput'], '%')}",
             f"steps: {g['useful_steps']} useful, {g['skipped_steps']} skipped; faults: {g['faults']}"]
    if g["comm_bytes"]:
        lines.append(f"communication: {g['comm_bytes'] / 1e6:.1f} MB sent by rank 0, {fmt(g['comm_s'])} in collectives"
                     + (f"; on the simulated link the run would take {fmt(g['simulated_wall_s'])}"
                        if g["simulated_wall_s"] is not None else ""))
    if g["recommended_interval_s"]:
        source = "observed" if g["mtbf_observed"] else "given"
        lines.append(f"checkpoint every {g['recommended_interval_steps']} steps (~{g['recommended_interval_s']:.0f}s): "
                     f"sqrt(2 x MTBF {g['mtbf_s']:.0f}s ({source}) x cost {g['checkpoint_cost_s']:.3f}s)")
    else:
        lines.append("no interval recommendation: needs checkpoints and an MTBF (mtbf_hours, or observed faults)")
    return lines
