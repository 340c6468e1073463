"""Blocking checkpoint time as a share of RL step time, for the demo model.

Measures, in one run: the mean RL step time of the demo configuration, and the time the training
loop is blocked by one checkpoint in synchronous mode (copy + write + fsync + rename) and in
background mode (copy to host memory only). Prints a table and, last, a JSON line.
Goal: background blocking <= 2% of a step, so checkpointing every step costs under 2%.

    .venv/bin/python benchmarks/checkpoint_overhead.py
"""

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from keel.config import DemoConfig
from keel.models import init_model
from keel.resilience.checkpoint import Checkpointer
from keel.rl.trainer import RLTrainer
from keel.runlog import RunLog


def main(steps: int = 8, saves: int = 5) -> dict:
    torch.manual_seed(0)
    cfg = DemoConfig()
    model, tokenizer = init_model(cfg.model.arch, cfg.model.layers, cfg.model.hidden, cfg.model.seed)
    trainer = RLTrainer(model, tokenizer, cfg.stage("rl"))
    trainer.step()  # warm-up
    step_times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.step()
        step_times.append(time.perf_counter() - t0)
    step_s = statistics.median(step_times)
    result = {"params": sum(p.numel() for p in model.parameters()), "step_s": step_s}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sync", "async"):
            log = RunLog(Path(tmp) / mode)
            ckpt = Checkpointer(Path(tmp) / mode / "checkpoints", log, every=1, keep=2, background=mode == "async")
            blocking, total = [], []
            for i in range(saves):
                tensors, state = trainer.state()
                t0 = time.perf_counter()
                ckpt.save(i + 1, tensors, state)
                blocking.append(time.perf_counter() - t0)
                ckpt.wait()
                total.append(time.perf_counter() - t0)
            log.close()
            size = sum(f.stat().st_size for f in (Path(tmp) / mode / "checkpoints").rglob("*") if f.is_file()) / 2
            result[f"{mode}_blocking_s"] = statistics.median(blocking)
            result[f"{mode}_write_s"] = statistics.median(total)
            result[f"{mode}_share"] = result[f"{mode}_blocking_s"] / step_s
            result["checkpoint_mb"] = size / 1e6
    print(f"demo model: {result['params'] / 1e6:.2f}M params, checkpoint {result['checkpoint_mb']:.1f} MB, "
          f"RL step {step_s * 1000:.0f} ms (median of {steps})")
    print(f"{'mode':<8}{'blocking ms':>14}{'write ms':>12}{'share of a step':>18}")
    for mode in ("sync", "async"):
        print(f"{mode:<8}{result[f'{mode}_blocking_s'] * 1000:>14.1f}{result[f'{mode}_write_s'] * 1000:>12.1f}"
              f"{result[f'{mode}_share'] * 100:>17.2f}%")
    result["goal_share"] = 0.02
    result["goal_met"] = result["async_share"] <= 0.02
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
