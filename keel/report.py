"""Plots and run reports: PNGs for people, JSON for machines; and a run's goodput.

Goodput: how much of a run's wall time went into useful steps, and how often to checkpoint.
Useful time is the step time of the steps that survived into metrics.jsonl; checkpointing is the
time the loop was blocked writing checkpoints; the rest of the wall time was lost to faults
(recomputed steps, restarts, start-up). The recommended interval is the Young/Daly optimum
sqrt(2 * MTBF * C), with C the measured blocking cost of one checkpoint.

Distributed runs add what rank 0 sent (`comm_bytes`), the time it spent in collectives, and with
a simulated link (`--simulate-link`) the wall time the run would have taken on it: measured wall
time, minus the time in collectives here, plus the time those bytes take on the simulated link.

Per stage, `keel report` also shows the steps' peak memory (the largest step's and the last one's;
under torchrun the busiest rank's) and the MB sent per step by purpose (FSDP's all-gathers and
reduce-scatters, DDP's gradients, DiLoCo's pseudo-gradients, metrics, control), in a table and in
OUT/resources_<stage>.png (`plot_resources`). Sizes are MB of 10^6 bytes.
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

# What each metric is called on a plot.
SERIES = {
    "reward": "total reward", "reward_correct": "correct-answer reward", "reward_format": "format reward",
    "accuracy": "accuracy of the step's samples", "test_pass@1": "test pass@1 (greedy)",
    "response_length": "response length", "kl": "KL to the reference (k3)", "loss": "loss",
    "peak_rss_mb": "peak resident set, host (high-water mark since start)",
    "peak_device_mb": "peak accelerator memory in the step",
}
MEMORY = ("peak_rss_mb", "peak_device_mb")  # per step, MB: train/loop.peak_memory
SENT = "comm_bytes_"  # + purpose: bytes rank 0 sent in the step for it (distributed/comm.Comm.take_step)
# The y-axis of a plot of one metric, where the caller names none.
YLABELS = {"loss": "loss (nats per token)", "kl": "KL (nats per token)", "response_length": "tokens"}

# (file name, title, panels); a panel is (metric keys drawn on one y-axis, that axis's label). The
# correct-answer reward has a panel of its own: beside the format reward (near 1 from the start)
# its climb from near 0 was squeezed flat.
RL_PLOTS = [
    ("reward.png", "reward per step (total = correct + format_weight x format)",
     [(["reward_correct"], "correct-answer reward"), (["reward_format"], "format reward"), (["reward"], "total reward")]),
    ("accuracy.png", "accuracy per step", [(["accuracy", "test_pass@1"], "share correct")]),
    ("length.png", "response length per step", [(["response_length"], "tokens")]),
    ("kl.png", "KL to the reference (k3) per step", [(["kl"], "KL (nats per token)")]),
]


def _smooth(values, window: int):
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def figure(rows: list[dict], panels: list[tuple[list[str], str]], title: str, smooth: int = 1):
    """A figure of metrics per step, one panel per (keys, y-axis label), stacked over a shared step
    axis, each series in its own colour. With `smooth` > 1 a long series is drawn faint as measured
    and solid as its moving mean, and the legend says which is which."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(6, 1.4 + 2.1 * len(panels)), dpi=110, sharex=True,
                             squeeze=False)
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    for ax, (keys, ylabel) in zip(axes[:, 0], panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            steps, values = zip(*pts)
            name, colour = SERIES.get(key, key), next(colours)
            if smooth > 1 and len(values) > 3 * smooth:  # sparse series (periodic evals) stay raw
                ax.plot(steps, values, alpha=0.25, color=colour, label=f"{name}, each step")
                ax.plot(steps, _smooth(values, smooth), color=colour, label=f"{name}, mean of the last {smooth} steps")
            else:
                ax.plot(steps, values, color=colour, label=name, marker="o" if len(values) < 30 else None)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("step")
    return fig


def plot(rows: list[dict], keys: list[str], title: str, path: Path, smooth: int = 1, ylabel: str | None = None) -> Path:
    """One panel of `keys` per step, written to `path`; the y-axis is `ylabel` (default: YLABELS or
    the metric's name)."""
    ylabel = ylabel or YLABELS.get(keys[0], SERIES.get(keys[0], keys[0]))
    return save_figure(figure(rows, [(keys, ylabel)], title, smooth), path)


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
    for name, title, panels in RL_PLOTS:
        if rl_rows:
            paths.append(save_figure(figure(rl_rows, panels, title, smooth=5), out / name))
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


def step_resources(rows: list[dict]) -> dict[str, dict]:
    """Per stage of metrics rows: how many steps; for each memory figure the largest step's and the
    last step's (MB); the mean MB sent per step, in all (`all`) and by purpose."""
    out = {}
    for stage in dict.fromkeys(r.get("stage", "") for r in rows):
        mine = [r for r in rows if r.get("stage", "") == stage]
        memory = {}
        for key in MEMORY:
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                memory[key] = {"max": max(values), "final": values[-1]}
        sent = {}
        if any(r.get("comm_bytes") for r in mine):  # one process sends nothing
            kinds = sorted({k.removeprefix(SENT) for r in mine for k in r if k.startswith(SENT)})
            for kind, key in [("all", "comm_bytes")] + [(kind, SENT + kind) for kind in kinds]:
                sent[kind] = sum(r.get(key) or 0 for r in mine) / len(mine) / 1e6
        out[stage] = {"steps": len(mine), "memory_mb": memory, "sent_mb_per_step": sent}
    return out


def format_resources(stages: dict[str, dict]) -> list[str]:
    """`step_resources` as a table, one line per stage."""
    memory = [key for key in MEMORY if any(key in s["memory_mb"] for s in stages.values())]
    kinds = list(dict.fromkeys(kind for s in stages.values() for kind in s["sent_mb_per_step"]))
    names = {"peak_rss_mb": "peak RSS MB", "peak_device_mb": "device peak MB"}
    header = (["stage", "steps"] + [f"{names[key]} {which}" for key in memory for which in ("max", "final")]
              + [f"MB/step {kind}" for kind in kinds])
    table = [header]
    for stage, s in stages.items():
        cells = [stage or "-", str(s["steps"])]
        for key in memory:
            m = s["memory_mb"].get(key)
            cells += [f"{m['max']:.1f}", f"{m['final']:.1f}"] if m else ["-", "-"]
        table.append(cells + [f"{s['sent_mb_per_step'][k]:.3g}" if k in s["sent_mb_per_step"] else "-" for k in kinds])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["per step (memory: the busiest rank's; RSS a high-water mark since start; sent: rank 0's)"]
    return lines + ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                    for row in table]


def plot_resources(out: str | Path) -> list[Path]:
    """OUT/resources_<stage>.png per stage of the run folder's metrics: peak memory per step, and
    with communication the MB sent per step by purpose."""
    out = Path(out)
    rows = read_jsonl(out / "metrics.jsonl")
    paths = []
    for stage in dict.fromkeys(r.get("stage", "") for r in rows):
        mine = [r for r in rows if r.get("stage", "") == stage]
        panels = [(list(MEMORY), "MB")]
        kinds = sorted({k.removeprefix(SENT) for r in mine for k in r if k.startswith(SENT)})
        if kinds:  # a distributed run: per purpose, as MB
            mine = [{**r, **{f"sent: {k}": r.get(SENT + k, 0) / 1e6 for k in kinds}} for r in mine]
            panels.append(([f"sent: {k}" for k in kinds], "MB sent per step"))
        name = f"resources_{stage}.png" if stage else "resources.png"
        title = f"{stage or 'run'}: peak memory" + (" and MB sent" if kinds else "") + " per step"
        paths.append(save_figure(figure(mine, panels, title), out / name))
    return paths


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
    # Skips are counted from events.jsonl: a skipped step's row is gone from metrics.jsonl once a
    # rollback or a restart from an earlier checkpoint truncated it.
    skipped = {(e.get("stage"), e.get("step")) for e in events if e["event"] == "skip"}
    faulted = any(faults.values()) or any(e["event"] in ("fault_injected", "skip") for e in events)
    overhead = max(0.0, wall - useful - checkpointing)
    observed_mtbf = wall / n_faults if n_faults else None
    mtbf_s = mtbf_hours * 3600 if mtbf_hours else observed_mtbf
    cost = sum(blocking) / len(blocking) if blocking else None
    step_s = useful / max(1, sum(1 for r in rows if r.get("step_s")))
    interval_s = math.sqrt(2 * mtbf_s * cost) if mtbf_s and cost else None
    comm_s = sum(r.get("comm_s") or 0.0 for r in rows)
    link_s = sum(r.get("link_s") or 0.0 for r in rows) if any("link_s" in r for r in rows) else None
    return {
        "comm_bytes": sum(r.get("comm_bytes") or 0 for r in rows), "comm_s": comm_s,
        "comm_bytes_per_step": max((r["comm_bytes"] for r in rows if "comm_bytes" in r), default=0),
        "simulated_wall_s": None if link_s is None else wall - comm_s + link_s,
        "wall_s": wall, "useful_s": useful, "checkpoint_s": checkpointing,
        # What is neither a useful step nor checkpointing: start-up, evaluations, and with faults the
        # recomputed steps and restarts. Only a run that had faults lost time to them.
        "lost_s": overhead if faulted else 0.0, "other_s": 0.0 if faulted else overhead,
        "goodput": useful / wall if wall else None,
        "useful_steps": sum(1 for r in rows if not r.get("skipped")),
        "skipped_steps": len(skipped),
        "faults": faults, "mtbf_s": mtbf_s, "mtbf_observed": mtbf_hours is None and observed_mtbf is not None,
        "checkpoint_cost_s": cost, "mean_step_s": step_s,
        "recommended_interval_s": interval_s,
        "recommended_interval_steps": max(1, round(interval_s / step_s)) if interval_s and step_s else None,
        "stages": step_resources(rows),
    }


def format_goodput(g: dict) -> list[str]:
    """The lines `keel report` prints for a `goodput` result, for people."""
    fmt = lambda v, unit="s": "n/a" if v is None else f"{v:.1f}{unit}"  # noqa: E731
    rest = (f"lost to faults, start-up and evaluation {fmt(g['lost_s'])}" if g["lost_s"]
            else f"start-up and evaluation {fmt(g['other_s'])}")
    lines = [f"wall {fmt(g['wall_s'])}  useful {fmt(g['useful_s'])}  checkpointing {fmt(g['checkpoint_s'])}  "
             f"{rest}  goodput {fmt(g['goodput'] and 100 * g['goodput'], '%')}",
             f"steps: {g['useful_steps']} useful, {g['skipped_steps']} skipped; faults: {g['faults']}"]
    if g["comm_bytes"]:
        lines.append(f"communication: {g['comm_bytes'] / 1e6:.1f} MB sent by rank 0 (at most "
                     f"{g['comm_bytes_per_step'] / 1e6:.1f} MB in a step), {fmt(g['comm_s'])} in collectives"
                     + (f"; on the simulated link the run would take {fmt(g['simulated_wall_s'])}"
                        if g["simulated_wall_s"] is not None else ""))
    if g["recommended_interval_s"]:
        source = "observed" if g["mtbf_observed"] else "given"
        lines.append(f"checkpoint every {g['recommended_interval_steps']} steps (~{g['recommended_interval_s']:.0f}s): "
                     f"sqrt(2 x MTBF {g['mtbf_s']:.0f}s ({source}) x cost {g['checkpoint_cost_s']:.3f}s)")
    else:
        lines.append("no interval recommendation: needs checkpoints and an MTBF (mtbf_hours, or observed faults)")
    return lines + (format_resources(g["stages"]) if g["stages"] else [])
