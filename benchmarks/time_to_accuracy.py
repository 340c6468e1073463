"""Time to accuracy: keel's RL trainer vs TRL's GRPOTrainer, wall seconds until held-out greedy
pass@1 reaches a target (0.70) on the demo's 200 test questions.

Both sides start from the demo's SFT model (built once here by keel's own demo SFT stage, or a
folder passed with --sft-model) and train the demo's RL stage: the same training prompts in the
same order (keel's `Epochs` over `train_prompts`, the RL seed: the demo's 1 unless `--seeds`), 8 prompts x 8 samples a step, reward =
keel's verifier (correct + 0.1 x format, as keel's trainer scores it, on the completion decoded
without special tokens), GRPO (clip 0.2, per-sequence token mean, group std scaling, k3 KL to the
SFT model with beta 0.005), lr 5e-5 constant, AdamW betas (0.9, 0.95) without weight decay,
grad clip 1, 48 new tokens at temperature 1, fp32 on the CPU, the same torch thread count. EOS
ends a sample on both sides.

Every `--eval-every` steps each side scores its live model with keel's evaluator
(`keel.evaluate.evaluate`, greedy, the demo's 200 test questions); for TRL that happens in a
TrainerCallback. The evaluation's time is taken OUT of both sides' wall clocks (and it draws no
random numbers the training uses), so a side's clock counts trainer construction (keel's ONNX
export included), rollouts, rewards, updates and weight syncs, and nothing else. A side stops
when it reaches the target or after `--max-steps`.

Sides, each in its own subprocess (its peak RSS, VmHWM, is its own), run one after another:
  keel       keel's trainer sampling on its own model (the demo's RL stage as `keel demo` runs it)
  trl        TRL's GRPOTrainer at its fastest setting here (gradient checkpointing off)
  keel-none  with --keel-rollout SPEC: keel sampling on that backend (e.g. onnxruntime:cpu:fp32,
             onnxruntime:cpu:int8 where that lands), off-policy correction off (`correction: none`)
  keel-tis   the same with the correction on (`correction: tis`, truncated at 2)
             (--keel-async-steps 1: both of these sample step n+1 while training on step n)

Threads: every side's torch runs `--threads` intra-op threads; an ONNX Runtime sampler picks its
own count (the rollout config has no threads knob: all cores), and `async_steps: 1` splits the
torch threads between trainer and sampler (at least one each), so compare those sides at
`--threads` = the machine's cores. With async 1 the sampling thread is joined inside each step,
so nothing runs while the benchmark evaluates.

Where a side crosses the target depends on the seed (an evaluation every 10 steps, a few points of
pass@1 between evaluations), so `--seeds 1,2,3` runs every side once per seed (both sides on the
same seed) and reports medians over the seeds; a side that misses the target on any seed has no
median.

Writes, under --work: sft-<steps>/model (reused), pass_at_1.png (the pass@1 curves against wall
seconds, one line per side and seed) and results.json; prints a table (one row per seed and side)
and, last, one JSON line with keel_s, trl_s (medians over the seeds) and ratio (keel_s / trl_s;
keel_s is keel-tis's when --keel-rollout is given, else keel's), the ratio per seed, and the
correction off/on figures. Seconds are null where a side never reached the target.

    .venv/bin/python -m pip install -e ".[bench]"   # TRL
    .venv/bin/python benchmarks/time_to_accuracy.py --threads 2
    .venv/bin/python benchmarks/time_to_accuracy.py --threads 2 --keel-rollout onnxruntime:cpu:fp32
    .venv/bin/python benchmarks/time_to_accuracy.py --threads 2 --keel-rollout onnxruntime:cpu:int8 --seeds 1,2,3
    .venv/bin/python benchmarks/time_to_accuracy.py --sft-steps 30 --max-steps 4 --eval-every 2 --eval-n 20  # a check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDES = ("keel", "trl", "keel-none", "keel-tis")


def demo():
    from keel.config import DemoConfig

    return DemoConfig()


def rl_config(max_steps: int, rollout: str | None, correction: str, compile: bool, async_steps: int = 0,
              seed: int | None = None):
    """The demo's RL stage on the CPU in fp32 (TRL's dtype here), no in-loop evaluation (the
    benchmark evaluates), optionally sampling on another backend, overlapped with training;
    `seed` replaces the demo's (its sampling and its prompt order)."""
    from keel.config import RolloutConfig, from_dict
    from keel.engine.backends import rollout_section

    section = from_dict(RolloutConfig, rollout_section(rollout), "rollout") if rollout else None
    rl = demo().stage("rl")
    return dataclasses.replace(rl, steps=max_steps, device="cpu", dtype="fp32", eval_every=0,
                               compile=compile, rollout=section, correction=correction,
                               seed=rl.seed if seed is None else seed,
                               **({"async_steps": async_steps} if async_steps else {}))


def eval_config(n: int):
    return dataclasses.replace(demo().stage("eval"), n=n, device="cpu")


class Clock:
    """Wall seconds since `start()`, minus the time spent in `evaluate` (the benchmark's own
    measuring, not training)."""

    def __init__(self, model, tokenizer, eval_n: int):
        self.model, self.tokenizer, self.eval_cfg = model, tokenizer, eval_config(eval_n)
        self.eval_s, self.t0 = 0.0, None
        self.curve = [{"step": 0, "wall_s": 0.0, "pass@1": self.pass_at_1()}]

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.eval_s = 0.0

    def pass_at_1(self) -> float:
        from keel.evaluate import evaluate

        was_training = self.model.training
        self.model.eval()
        try:
            return evaluate(self.model, self.tokenizer, self.eval_cfg, samples=False)["pass@1"]
        finally:
            self.model.train(was_training)

    def record(self, step: int) -> float:
        t = time.perf_counter()
        wall = t - self.t0 - self.eval_s
        p = self.pass_at_1()
        self.eval_s += time.perf_counter() - t
        self.curve.append({"step": step, "wall_s": wall, "pass@1": p})
        print(f"  step {step:>4}  {wall:8.1f} s  pass@1 {p:.3f}", file=sys.stderr, flush=True)
        return p


def due(step: int, args) -> bool:
    return step % args.eval_every == 0 or step == args.max_steps


# ----------------------------------------------------------------------------- keel side


def run_keel(args, correction: str) -> dict:
    from keel.models import load_model
    from keel.rl.trainer import RLTrainer

    model, tokenizer = load_model(args.model_dir)
    clock = Clock(model, tokenizer, args.eval_n)
    cfg = rl_config(args.max_steps, args.keel_rollout, correction, args.keel_compile,
                    args.keel_async_steps if args.keel_rollout else 0, args.seed)
    clock.start()
    trainer = RLTrainer(model, tokenizer, cfg)
    rows = []
    for step in range(1, args.max_steps + 1):
        rows.append(trainer.step())
        if due(step, args) and clock.record(step) >= args.target:
            break
    out = {"curve": clock.curve, "steps": len(rows), "eval_s": clock.eval_s, "rss_mb": peak_rss_mb(),
           "correction": trainer.correction, "sampler": getattr(trainer.sampler, "name", "trainer")}
    for key in ("response_length", "mismatch_kl", "correction_share", "ess", "weight_sync_s", "rollout_s", "step_s"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = sum(values) / len(values)
    return out


# ----------------------------------------------------------------------------- TRL side


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from keel.epochs import Epochs
    from keel.models import load_model, render_prompt, special_ids
    from keel.rl.trainer import train_prompts
    from keel.tasks import get_task

    rl = rl_config(args.max_steps, None, "none", False, seed=args.seed)
    model, tokenizer = load_model(args.model_dir)
    clock = Clock(model, tokenizer, args.eval_n)
    clock.start()  # keel's clock counts its prompt pool too (RLTrainer draws it)
    task = get_task(rl.task, **rl.task_options)
    # keel's trainer draws its prompts exactly so; TRL reads them in order (shuffle_dataset off)
    examples = Epochs(train_prompts(task, rl.seed), rl.seed).take(rl.prompts_per_step * args.max_steps)
    messages = [[{"role": "user", "content": ex.question}] for ex in examples]
    dataset = Dataset.from_dict({"prompt": messages, "idx": list(range(len(examples)))})

    lengths = []

    def reward(prompts, completions, completion_ids, idx, **_):
        lengths.extend(len(ids) for ids in completion_ids)
        # keel scores the completion decoded without special tokens: the same text here
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]
        scores = [task.reward(text, examples[i]) for text, i in zip(texts, idx)]
        return [float(s["correct"]) + rl.format_weight * float(s["format"]) for s in scores]

    steps = []

    class Evaluate(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            steps.append(state.global_step)
            clock.model = kwargs["model"]  # the live model TRL trains (the same object on one CPU process)
            if due(state.global_step, args) and clock.record(state.global_step) >= args.target:
                control.should_training_stop = True

    spec = rl.loss_spec
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, fp16=False, seed=rl.seed, data_seed=rl.seed,
            max_steps=args.max_steps, per_device_train_batch_size=rl.prompts_per_step * rl.group_size,
            gradient_accumulation_steps=1, num_generations=rl.group_size, max_completion_length=rl.max_new_tokens,
            temperature=rl.temperature, top_p=rl.top_p, top_k=0,
            loss_type="grpo", beta=rl.beta, num_iterations=rl.updates_per_batch, scale_rewards="group",
            epsilon=spec.eps_low, epsilon_high=spec.eps_high,
            learning_rate=rl.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=rl.grad_clip,
            adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0,  # keel.optim's AdamW
            gradient_checkpointing=False,  # TRL's default (True) recomputes activations: slower
            disable_dropout=True, shuffle_dataset=False, dataloader_num_workers=0,
            report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, log_completions=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Evaluate()])
        assert config.steps_per_generation == 1, config.steps_per_generation
        ids = trainer._tokenize_prompts(messages[:8])[0]  # the same prompt tokens as keel's
        assert [list(i) for i in ids] == [render_prompt(tokenizer, ex.question) for ex in examples[:8]]
        assert trainer.eos_token_ids == [special_ids(tokenizer)[0]], trainer.eos_token_ids  # the same stop
        trainer.train()
    return {"curve": clock.curve, "steps": len(steps), "eval_s": clock.eval_s, "rss_mb": peak_rss_mb(),
            "torch_threads": torch.get_num_threads(), "response_length": sum(lengths) / max(1, len(lengths))}


# ----------------------------------------------------------------------------- driver


def child(args) -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    out = run_trl(args) if args.side == "trl" else run_keel(args, {"keel": "auto", "keel-none": "none",
                                                                    "keel-tis": "tis"}[args.side])
    print(json.dumps(out))


def spawn(side: str, model_dir: Path, args, seed: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, __file__, "--side", side, "--model-dir", str(model_dir), "--threads", str(args.threads),
           "--max-steps", str(args.max_steps), "--eval-every", str(args.eval_every), "--eval-n", str(args.eval_n),
           "--target", str(args.target), "--seed", str(seed)] + (["--keel-compile"] if args.keel_compile else []) + (
           ["--keel-rollout", args.keel_rollout, "--keel-async-steps", str(args.keel_async_steps)]
           if side in ("keel-none", "keel-tis") else [])
    print(f"{side}, seed {seed}:", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)  # progress on stderr as it comes
    if proc.returncode:
        raise SystemExit(f"the {side} run failed (exit status {proc.returncode}; its error is above)")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


def sft_model(work: Path, steps: int | None) -> Path:
    """The demo's SFT stage (with `steps` if given), once; later runs reuse it."""
    from keel.models import init_model, save_model
    from keel.train.sft import sft

    cfg = demo()
    stage = dataclasses.replace(cfg.stage("sft"), device="cpu", **({"steps": steps} if steps else {}))
    out = work / f"sft-{stage.steps}"
    if not (out / "model").is_dir():
        print(f"building the SFT model (the demo's SFT stage, {stage.steps} steps) in {out}", file=sys.stderr)
        model, tokenizer = init_model(**dataclasses.asdict(cfg.model))
        sft(model, tokenizer, stage, out)
        save_model(model, tokenizer, out / "model")
    return out / "model"


def reached(curve: list[dict], target: float) -> dict | None:
    """The first evaluation at or above `target`."""
    return next((c for c in curve if c["pass@1"] >= target), None)


def pass_at(curve: list[dict], wall_s: float) -> float:
    """pass@1 of the last evaluation at or before `wall_s` (the model a side had by then)."""
    return [c for c in curve if c["wall_s"] <= wall_s][-1]["pass@1"]


def summarise(side: str, res: dict, target: float) -> dict:
    hit = reached(res["curve"], target)
    s = {"s": None if hit is None else round(hit["wall_s"], 2), "steps": None if hit is None else hit["step"],
         "final_pass@1": res["curve"][-1]["pass@1"], "steps_run": res["steps"],
         "train_s": round(res["curve"][-1]["wall_s"], 2), "eval_s": round(res["eval_s"], 2),
         "rss_mb": round(res["rss_mb"], 1)}
    for key in ("response_length", "sampler", "correction", "mismatch_kl", "correction_share", "ess", "weight_sync_s"):
        if key in res:
            s[key] = round(res[key], 6) if isinstance(res[key], float) else res[key]
    return s


def plot(runs: dict, target: float, path: Path, rollout: str | None) -> Path:
    """pass@1 against wall seconds: one colour per side, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keel.report import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sides = list(next(iter(runs.values())))
    for i, side in enumerate(sides):
        label = {"keel-none": f"keel on {rollout}, no correction",
                 "keel-tis": f"keel on {rollout}, TIS"}.get(side, side)
        for j, results in enumerate(runs.values()):
            curve = results[side]["curve"]
            ax.plot([c["wall_s"] for c in curve], [c["pass@1"] for c in curve], marker="o", markersize=3,
                    color=f"C{i}", alpha=0.8, label=label if j == 0 else None)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.2f}")
    ax.set_xlabel("wall seconds (evaluation excluded)")
    ax.set_ylabel("held-out greedy pass@1")
    ax.set_title(f"time to accuracy: the demo's RL stage from its SFT model, {len(runs)} seed(s)")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def median_or_none(values: list) -> float | None:
    """The median of `values`, or None when any is None (a seed where the target was not reached)."""
    return None if not values or any(v is None for v in values) else statistics.median(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft-model", type=Path, help="start from this SFT model folder (default: build the demo's)")
    p.add_argument("--sft-steps", type=int, help="SFT steps when building it (default: the demo's 300)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "time_to_accuracy",
                   help="folder for the SFT model, the plot and results.json")
    p.add_argument("--target", type=float, default=0.70, help="held-out greedy pass@1 to reach")
    p.add_argument("--max-steps", type=int, default=300, help="RL steps per side at most")
    p.add_argument("--eval-every", type=int, default=10, help="steps between evaluations, both sides")
    p.add_argument("--eval-n", type=int, default=200, help="test questions per evaluation (the demo's 200)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on every side")
    p.add_argument("--keel-rollout", metavar="SPEC",
                   help="also run keel sampling on this backend, correction off and on (e.g. onnxruntime:cpu:fp32)")
    p.add_argument("--keel-async-steps", type=int, default=0, choices=[0, 1],
                   help="async_steps of the --keel-rollout sides (1: sampling overlaps training, one step behind)")
    p.add_argument("--keel-compile", action="store_true", help="keel sides compile their decode step (compile "
                   "time counts in their wall clock)")
    p.add_argument("--sides", default=None, help=f"comma-separated subset of {', '.join(SIDES)} (default: keel, "
                   "trl, and keel-none, keel-tis with --keel-rollout)")
    p.add_argument("--seeds", default="1", help="comma-separated RL seeds (sampling and prompt order) on both "
                   "sides; each side runs once per seed and the figures are medians (default: the demo's 1)")
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)  # internal: one side's seed
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side's run
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.max_steps < 1 or args.eval_every < 1 or args.eval_n < 1 or args.threads < 1:
        p.error("--max-steps, --eval-every, --eval-n and --threads must be >= 1")
    if args.side:
        return child(args)
    sides = args.sides.split(",") if args.sides else ["keel", "trl"] + (
        ["keel-none", "keel-tis"] if args.keel_rollout else [])
    if unknown := set(sides) - set(SIDES):
        p.error(f"unknown sides {sorted(unknown)}: use {', '.join(SIDES)}")
    if {"keel-none", "keel-tis"} & set(sides) and not args.keel_rollout:
        p.error("keel-none and keel-tis need --keel-rollout SPEC")
    if args.keel_rollout:  # a spec this keel cannot sample on fails here, before anything runs
        from keel.errors import KeelError

        try:
            rl_config(1, args.keel_rollout, "tis", False, args.keel_async_steps)
        except KeelError as e:
            p.error(f"--keel-rollout {args.keel_rollout}: {e}")

    model_dir = args.sft_model or sft_model(args.work, args.sft_steps)
    seeds = [int(x) for x in args.seeds.split(",")]
    runs, summaries = {}, {}
    for seed in seeds:  # every side on one seed, then the next seed
        results = {side: spawn(side, model_dir, args, seed) for side in sides}
        starts = {side: r["curve"][0]["pass@1"] for side, r in results.items()}
        assert len(set(starts.values())) == 1, f"the sides scored the SFT model differently: {starts}"
        summary = {side: summarise(side, r, args.target) for side, r in results.items()}
        equal_s = min(r["curve"][-1]["wall_s"] for r in results.values())  # every side ran this long
        for side, r in results.items():
            summary[side]["pass@1_at_equal_s"] = pass_at(r["curve"], equal_s)
        summary["equal_wall_s"] = round(equal_s, 2)
        runs[seed], summaries[seed] = results, summary
    png = plot(runs, args.target, args.work / "pass_at_1.png", args.keel_rollout)
    sft_pass = runs[seeds[0]][sides[0]]["curve"][0]["pass@1"]

    print(f"from the SFT model at pass@1 {sft_pass:.3f} to {args.target:.2f}, eval every {args.eval_every} steps "
          f"on {args.eval_n} questions, {args.threads} threads, seeds {args.seeds}; curves in {png}")
    print(f"{'seed':<6}{'side':<11}{'s to target':>12}{'steps':>7}{'pass@1 @ equal s':>18}{'final pass@1':>14}"
          f"{'steps run':>11}{'peak RSS MB':>13}{'mismatch KL':>13}{'corrected':>11}")
    for seed, summary in summaries.items():
        for side in sides:
            s = summary[side]
            secs = "not reached" if s["s"] is None else f"{s['s']:.1f}"
            kl = f"{s['mismatch_kl']:.2e}" if "mismatch_kl" in s else "-"
            share = f"{s['correction_share']:.4f}" if "correction_share" in s else "-"
            at_equal = f"{s['pass@1_at_equal_s']:.3f} @ {summary['equal_wall_s']:.0f}s"
            print(f"{seed:<6}{side:<11}{secs:>12}{s['steps'] or '-':>7}{at_equal:>18}{s['final_pass@1']:>14.3f}"
                  f"{s['steps_run']:>11}{s['rss_mb']:>13.0f}{kl:>13}{share:>11}")
    medians = {side: median_or_none([summaries[seed][side]["s"] for seed in seeds]) for side in sides}
    print("median seconds to target: " + ", ".join(
        f"{side} {'not reached on every seed' if m is None else f'{m:.1f}'}" for side, m in medians.items()))

    main_side = "keel-tis" if "keel-tis" in sides else "keel"
    keel_s, trl_s = medians.get(main_side), medians.get("trl")
    ratio = keel_s / trl_s if keel_s and trl_s else None
    ratio_runs = [summaries[seed][main_side]["s"] / summaries[seed]["trl"]["s"]
                  if "trl" in sides and summaries[seed][main_side]["s"] and summaries[seed]["trl"]["s"] else None
                  for seed in seeds]
    if ratio is not None:
        print(f"{main_side} / trl: {ratio:.2f} (medians over seeds; per seed: "
              f"{', '.join('-' if r is None else f'{r:.2f}' for r in ratio_runs)}; goal <= 0.5)")
    import torch
    import trl

    def on_seeds(side):
        return None if side not in sides else {seed: summaries[seed][side] for seed in seeds}

    report = {
        "benchmark": "time_to_accuracy", "trl": trl.__version__, "torch": torch.__version__, "threads": args.threads,
        "target": args.target, "eval_every": args.eval_every, "eval_n": args.eval_n, "max_steps": args.max_steps,
        "keel_async_steps": args.keel_async_steps, "keel_compile": args.keel_compile, "seeds": seeds,
        "sft_model": str(model_dir), "sft_pass@1": sft_pass, "keel_side": main_side,
        "keel_s": keel_s, "trl_s": trl_s, "ratio": None if ratio is None else round(ratio, 3),
        "ratio_runs": [None if r is None else round(r, 3) for r in ratio_runs],
        "median_s": medians, "keel_torch_s": medians.get("keel"),
        "correction": None if not args.keel_rollout else {
            "rollout": args.keel_rollout, "off": on_seeds("keel-none"), "on": on_seeds("keel-tis")},
        "sides": summaries, "curves": {seed: {side: r["curve"] for side, r in res.items()} for seed, res in runs.items()},
        "goal_ratio": 0.5, "goal_met": ratio is not None and ratio <= 0.5, "plot": str(png),
    }
    from keel.io import atomic_write

    atomic_write(args.work / "results.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "curves"}))


if __name__ == "__main__":
    main()
