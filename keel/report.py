"""Plots and run reports: PNGs for people, JSON for machines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

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
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
