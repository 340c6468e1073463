"""`keel demo`: the whole pipeline on a 2-core CPU in minutes.

Build a small model from scratch, SFT it on generated worked traces, RL it with GRPO, and
evaluate on the held-out test split after each stage. The SFT budget is deliberately short: the
model learns the format and part of the skill, and RL, rewarded only by the verifier, has to
close the rest of the gap.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from keel.config import DemoConfig
from keel.device import pick_device
from keel.evaluate import evaluate
from keel.models import init_model, save_model
from keel.report import plot_run, write_json, write_markdown
from keel.rl.trainer import rl
from keel.runlog import RunLog, console, read_jsonl
from keel.train.sft import sft


def quick(cfg: DemoConfig = DemoConfig()) -> DemoConfig:
    """`keel demo --quick`: the same pipeline in about half the compute: 200 SFT steps instead of
    300, 50 RL steps instead of 150 at twice the learning rate (1e-4), a held-out check every 10
    RL steps, and the evaluations on 100 test questions instead of 200. Measured (one run, busy
    2-core CPU): test pass@1 0.15 after SFT, 0.25 after RL; the accuracy plot climbs."""
    return dataclasses.replace(
        cfg, sft=dataclasses.replace(cfg.sft, steps=200),
        rl=dataclasses.replace(cfg.rl, steps=50, lr=1e-4, eval_every=10, eval_n=100),
        eval=dataclasses.replace(cfg.eval, n=100))


def run_demo(cfg: DemoConfig = DemoConfig(), out: str | Path = "runs/demo") -> dict:
    out = Path(out)
    t0 = time.time()
    device = pick_device(cfg.sft.device)
    RunLog(out, fresh=True).close()  # a demo run starts its logs over
    model, tokenizer = init_model(cfg.model.arch, cfg.model.layers, cfg.model.hidden, cfg.model.seed)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"[bold]keel demo[/]: {cfg.model.arch} {n_params / 1e6:.2f}M params on {device}, task {cfg.task} {cfg.task_options}")
    eval_cfg = cfg.stage("eval")

    sft(model, tokenizer, cfg.stage("sft"), out)
    save_model(model, tokenizer, out / "sft" / "model")
    after_sft = evaluate(model, tokenizer, eval_cfg)
    console.print(f"after SFT: pass@1 {after_sft['pass@1']:.3f}  pass@{eval_cfg.k} {after_sft[f'pass@{eval_cfg.k}']:.3f}")

    rl(model, tokenizer, cfg.stage("rl"), out)
    after_rl = evaluate(model, tokenizer, eval_cfg)
    console.print(f"after RL:  pass@1 {after_rl['pass@1']:.3f}  pass@{eval_cfg.k} {after_rl[f'pass@{eval_cfg.k}']:.3f}")
    save_model(model, tokenizer, out / "model")

    rows = read_jsonl(out / "metrics.jsonl")
    plots = plot_run([r for r in rows if r.get("stage") == "rl"], [r for r in rows if r.get("stage") == "sft"], out)
    report = {
        "task": cfg.task, "task_options": cfg.task_options,
        "model": f"{cfg.model.arch}, {cfg.model.layers} layers, hidden {cfg.model.hidden}, {n_params} params",
        "device": str(device), "wall_s": time.time() - t0,
        "sft": after_sft, "rl": after_rl, "gain_pass@1": after_rl["pass@1"] - after_sft["pass@1"],
        "config": dataclasses.asdict(cfg),
    }
    write_json(report, out / "report.json")
    write_markdown(report, plots, out / "report.md")
    console.print(f"RL gain: {report['gain_pass@1'] * 100:+.1f} points of test pass@1 in {report['wall_s'] / 60:.1f} min; "
                  f"report in {out / 'report.md'}")
    return report
