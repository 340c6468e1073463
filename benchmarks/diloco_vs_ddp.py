"""DiLoCo against DDP: the same RL run on 2 ranks, gradients all-reduced every step vs
pseudo-gradients averaged every H steps.

Each variant is a real `torchrun --nproc-per-node 2 -m keel rl` run (gloo, CPU) from the same SFT
model with the same recipe (the demo's RL stage), so both see the same number of prompts and
tokens. For each: the bytes rank 0 sent, the wall time measured here, the wall time the run would
take on a 1 Gbit/s link with 1 ms latency (`--simulate-link 1,1`: measured time, minus time in
collectives here, plus the time the bytes need on that link) and held-out greedy pass@1.

    .venv/bin/python benchmarks/diloco_vs_ddp.py                   # builds the SFT model first (~2 min)
    .venv/bin/python benchmarks/diloco_vs_ddp.py --model DIR       # start from an SFT model folder

Prints a table and, last, one JSON line with bytes_ratio (DDP bytes / DiLoCo bytes at the best H),
pass@1_ddp and pass@1_diloco.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from keel.config import DemoConfig  # noqa: E402
from keel.evaluate import evaluate  # noqa: E402
from keel.models import init_model, load_model, save_model  # noqa: E402
from keel.report import goodput  # noqa: E402
from keel.runlog import read_jsonl  # noqa: E402
from keel.train.sft import sft  # noqa: E402


def sft_model(work: Path) -> Path:
    """The demo's SFT stage, once; later runs reuse it."""
    out = work / "sft"
    if not (out / "model").is_dir():
        demo = DemoConfig()
        model, tokenizer = init_model(**dataclasses.asdict(demo.model))
        print("building the SFT model (the demo's SFT stage)...", file=sys.stderr)
        sft(model, tokenizer, dataclasses.replace(demo.stage("sft"), device="cpu"), out)
        save_model(model, tokenizer, out / "model")
    return out / "model"


def run(name: str, model: Path, work: Path, rl: dict, distributed: dict, link: str) -> dict:
    out = work / name
    recipe = work / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({**rl, "distributed": distributed}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "keel", "rl",
           "--model", str(model), "--out", str(out), "--recipe", str(recipe), "--device", "cpu",
           "--simulate-link", link]
    if (out / "model").exists():
        import shutil
        shutil.rmtree(out)
    print(f"{name}: torchrun x2 ...", file=sys.stderr)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - start
    g = goodput(out)
    rows = read_jsonl(out / "metrics.jsonl")
    return {"name": name, "out": out, "bytes": sum(r.get("comm_bytes") or 0 for r in rows), "wall_s": wall,
            "train_s": g["wall_s"], "simulated_s": g["simulated_wall_s"], "steps": len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="SFT model folder (default: build the demo's)")
    p.add_argument("--work", type=Path, default=ROOT / "runs/bench-diloco")
    p.add_argument("--steps", type=int, default=160, help="RL steps (a multiple of every H keeps the syncs regular)")
    p.add_argument("--inner", type=int, nargs="+", default=[8, 32], help="DiLoCo H values")
    p.add_argument("--link", default="1,1", help="simulated link GBPS,LATENCY_MS")
    p.add_argument("--eval-n", type=int, default=200)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or sft_model(args.work)

    demo = DemoConfig()
    rl = {k: v for k, v in dataclasses.asdict(demo.stage("rl")).items() if k not in ("resilience", "distributed")}
    rl.update(steps=args.steps, eval_every=0)
    variants = [("ddp", {"sync": "ddp"})] + [(f"diloco_h{h}", {"sync": "diloco", "inner_steps": h}) for h in args.inner]
    results = [run(name, model, args.work, rl, dist, args.link) for name, dist in variants]

    eval_cfg = dataclasses.replace(demo.eval, n=args.eval_n, device="cpu", task=demo.task, task_options=demo.task_options)
    for r in results:
        m, tok = load_model(r["out"] / "model")
        r["pass@1"] = evaluate(m, tok, dataclasses.replace(eval_cfg, k=1), samples=False)["pass@1"]
    m, tok = load_model(model)
    start_pass = evaluate(m, tok, dataclasses.replace(eval_cfg, k=1), samples=False)["pass@1"]

    ddp = results[0]
    print(f"\n2 ranks (gloo, CPU), {args.steps} RL steps of {rl['prompts_per_step']} prompts x {rl['group_size']}; "
          f"SFT model pass@1 {start_pass:.3f}; simulated link {args.link} (Gbit/s, ms)")
    print(f"{'sync':<12} {'MB sent/rank':>12} {'bytes ratio':>11} {'wall s':>8} {'on link s':>10} {'pass@1':>7}")
    for r in results:
        print(f"{r['name']:<12} {r['bytes'] / 1e6:>12.2f} {ddp['bytes'] / r['bytes']:>11.1f} {r['train_s']:>8.1f} "
              f"{r['simulated_s']:>10.1f} {r['pass@1']:>7.3f}")
    best = max(results[1:], key=lambda r: ddp["bytes"] / r["bytes"])
    print(json.dumps({
        "bytes_ratio": ddp["bytes"] / best["bytes"], "best_inner_steps": int(best["name"].split("_h")[1]),
        "pass@1_ddp": ddp["pass@1"], "pass@1_diloco": best["pass@1"], "pass@1_sft": start_pass,
        **{f"bytes_{r['name']}": r["bytes"] for r in results},
        **{f"pass@1_{r['name']}": r["pass@1"] for r in results},
        **{f"simulated_s_{r['name']}": r["simulated_s"] for r in results},
        **{f"wall_s_{r['name']}": r["train_s"] for r in results},
    }))


if __name__ == "__main__":
    main()
