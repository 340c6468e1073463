"""GRPO training throughput: keel's RL trainer vs TRL's GRPOTrainer, same machine, model and work.

Both sides train the same locally built Qwen3 (saved once to a temp folder, loaded by each side
with transformers) on the same arithmetic prompts, rendered with the same chat template: 4 prompts
x 8 samples per optimizer step, exactly 64 completion tokens per sample (EOS never ends a sample),
the GRPO loss with beta 0 and one update per batch, the same reward function (keel's verifier),
the same torch thread count, and the same training precision, `--dtype`: fp32, or bf16 (keel
under bf16 autocast, TRL with `bf16=True`, Accelerate's bf16 autocast). bf16 pays on CPUs with
bf16 dot-product instructions (AVX512_BF16, e.g. Zen 4, where a bf16 matmul runs 2.3x an fp32
one, or AMX); elsewhere it is slower than fp32. Each side runs at its fastest setting: keel compiles its decode step (`RLConfig.compile`; the compile happens in the
warm-up steps), TRL runs its defaults minus gradient checkpointing. With `--keel-rollout SPEC`
a third side, `keel_rollout`, is keel sampling on another backend (RLConfig's `rollout` section,
e.g. onnxruntime:cpu:fp32, or onnxruntime:cpu:int8 where this keel has it) with the off-policy
correction `--keel-correction` (tis by default), with `--keel-async-steps 1` sampling step n+1
while it trains on step n; its weight sync to the sampler counts in its step time.
keel leaves rows of zero advantage out of the update when beta is 0 (their gradient is exactly
0); random-weight models never answer right, so under the verifier every row is such a row and
keel's update is skipped whole (the table's "rows skipped"). `--reward hash` scores completions
by a hash of their text on both sides instead, so that both run the whole update. Each side runs in its own
subprocess, so its peak RSS (VmHWM) is its own, and the sides alternate over `--repeats` runs;
the table and the JSON report medians. tokens/s = completion tokens of the timed steps / wall
seconds between the end of the last warm-up step and the end of the last timed step.

Needs the bench extra (TRL): `.venv/bin/python -m pip install -e ".[bench]"`. On a machine that
other jobs share, pass `--threads 1`: OpenMP threads that wait at a barrier for a descheduled
sibling made 2-thread runs 10-40x slower there, on both sides.

    .venv/bin/python benchmarks/grpo_vs_trl.py --model both --steps 5 --warmup 2 --repeats 3
    .venv/bin/python benchmarks/grpo_vs_trl.py --model 3m --profile   # also: where each side's step goes
    .venv/bin/python benchmarks/grpo_vs_trl.py --model both --keel-rollout onnxruntime:cpu:int8
    .venv/bin/python benchmarks/grpo_vs_trl.py --model both --dtype bf16 --keel-rollout torch:cpu:bf16  # Zen 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from common import peak_rss_mb

# layers, hidden: heads of 32 dims, intermediate 3 * hidden, tied embeddings
MODELS = {"27m": (8, 512), "3m": (6, 192)}
PROMPTS, GROUP, TOKENS = 4, 8, 64  # per optimizer step: 4 prompts x 8 samples x 64 tokens
LR, SEED, TASK = 1e-5, 0, {"digits": 3}
PHASES = ("generate", "weight_sync", "reward", "logprob_forward", "backward", "grad_clip", "optimizer")  # --profile
SIDES = ("keel", "trl", "keel_rollout")


def hash_reward(text: str) -> float:
    """`--reward hash`: 0 or 1 from a stable hash of the completion's text, the same function on
    both sides. Random-weight models never answer correctly, so under the verifier every group's
    rewards are equal, every advantage is 0, and keel (which skips rows of zero advantage when
    beta is 0: their gradient is exactly 0) trains on nothing; this reward gives the groups
    signal, so both sides run the whole update."""
    return float(zlib.crc32(text.encode("utf-8")) & 1)


def bench_prompts(n: int):
    """The first `n` training examples in the order keel's trainer draws them (same seed)."""
    from keel.epochs import Epochs
    from keel.rl.trainer import train_prompts
    from keel.tasks import get_task

    task = get_task("arithmetic", **TASK)
    return task, Epochs(train_prompts(task, SEED), SEED).take(n)


# ----------------------------------------------------------------------------- keel side


def rollout_settings(spec: str | None, correction: str, async_steps: int = 0) -> dict:
    """RLConfig's rollout, correction and async_steps fields for sampling on backend `spec` (none:
    the trainer's own model); a spec this keel cannot sample on fails here with its KeelError."""
    from keel.config import RolloutConfig, from_dict
    from keel.engine.backends import rollout_section

    if spec is None:
        return {}
    return {"rollout": from_dict(RolloutConfig, rollout_section(spec), "rollout"), "correction": correction,
            **({"async_steps": async_steps} if async_steps else {})}


def run_keel(model_dir: str, warmup: int, steps: int, profile: bool, compile: bool, dtype: str,
             rollout: str | None = None, correction: str = "tis", reward: str = "verifier",
             async_steps: int = 0) -> dict:
    from keel.config import RLConfig
    from keel.models import load_model
    from keel.rl.trainer import RLTrainer

    model, tokenizer = load_model(model_dir)
    cfg = RLConfig(task="arithmetic", task_options=TASK, loss="grpo", steps=warmup + steps,
                   prompts_per_step=PROMPTS, group_size=GROUP, updates_per_batch=1, lr=LR, temperature=1.0,
                   max_new_tokens=TOKENS, beta=0.0, format_weight=0.0, seed=SEED, device="cpu", dtype=dtype,
                   compile=compile, **rollout_settings(rollout, correction, async_steps))
    trainer = RLTrainer(model, tokenizer, cfg)
    # keel has no min-tokens knob: an id the sampler never draws (ids are >= 0) as EOS makes every
    # sample run to max_new_tokens, as min_new_tokens does on the TRL side.
    trainer.eos_id = -1
    if reward == "hash":  # the trainer scores completions with task.reward(text, example)
        trainer.task.reward = lambda text, example: {"correct": hash_reward(text), "format": 0.0}
    phases = profile_keel(trainer) if profile else None
    skipped = []
    ends = [time.perf_counter()]
    for i in range(warmup + steps):
        row = trainer.step()
        ends.append(time.perf_counter())
        assert row["groups"] == PROMPTS and row["response_length"] == TOKENS, row
        if i >= warmup:
            skipped.append(row.get("rows_skipped", 0.0))
        if i + 1 == warmup and phases is not None:
            phases.totals.clear()
    out = {"step_s": [b - a for a, b in zip(ends, ends[1:])], "timed_s": ends[-1] - ends[warmup],
           "tokens": steps * PROMPTS * GROUP * TOKENS, "rss_mb": peak_rss_mb(),
           "rows_skipped": sum(skipped) / len(skipped)}  # share of rows keel left out of the update
    if phases is not None:
        p = phases.per_step(steps)
        # guarded_update runs the micro-batches' training forwards too (timed as logprob_forward; with
        # beta 0 and one update there are no others)
        p["backward"] -= p["grad_clip"] + p["optimizer"] + p.get("logprob_forward", 0.0)
        out["phases_s"] = with_other(p, out["timed_s"] / steps)
    return out


class Phases:
    """Seconds spent in named pieces of a step, summed; `wrap` puts a timer around a method."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(name, time.perf_counter() - t0)
        setattr(owner, attr, timed)

    def per_step(self, steps: int) -> dict:
        return {k: v / steps for k, v in self.totals.items()}


def with_other(phases: dict, step_s: float) -> dict:
    """The named phases in PHASES order, plus "other": the rest of the step (data, advantages,
    loss math, logging)."""
    out = {k: phases.get(k, 0.0) for k in PHASES}
    return {**out, "other": step_s - sum(out.values())}


def profile_keel(trainer) -> Phases:
    """Time keel's rollout generate (on its own model or a backend), the weight sync to a backend,
    reward, log-prob forward (with grad), backward (the rest of guarded_update), grad clip and
    optimizer step."""
    import torch

    import keel.completions as C
    import keel.rl.trainer as T

    phases = Phases()
    phases.wrap(C, "generate", "generate")
    if trainer.sampler is not None:
        phases.wrap(trainer, "sync_sampler", "weight_sync")
    phases.wrap(trainer.task, "reward", "reward")
    phases.wrap(T, "completion_logprobs", "logprob_forward")
    phases.wrap(T, "guarded_update", "backward")  # minus clip and optimizer, below
    phases.wrap(torch.nn.utils, "clip_grad_norm_", "grad_clip")
    phases.wrap(trainer.optimizer, "step", "optimizer")
    return phases


# ----------------------------------------------------------------------------- TRL side


def run_trl(model_dir: str, warmup: int, steps: int, profile: bool, reward: str = "verifier",
            dtype: str = "fp32") -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from keel.models import load_model, render_prompt

    model, tokenizer = load_model(model_dir)
    task, examples = bench_prompts(PROMPTS * (warmup + steps))
    messages = [[{"role": "user", "content": ex.question}] for ex in examples]
    dataset = Dataset.from_dict({"prompt": messages, "idx": list(range(len(examples)))})
    seen = []

    def correct(prompts, completions, completion_ids, idx, **_):
        # Every completion must have run the full budget, or the two sides did different work.
        assert all(len(c) == TOKENS for c in completion_ids), [len(c) for c in completion_ids]
        seen.append(len(completion_ids) * TOKENS)
        if reward == "hash":  # keel scores the completion decoded without special tokens: the same text
            return [hash_reward(tokenizer.decode(ids, skip_special_tokens=True)) for ids in completion_ids]
        return [task.reward(c[0]["content"], examples[i])["correct"] for c, i in zip(completions, idx)]

    ends, phases = [], Phases()

    class StepClock(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            phases.add("optimizer", time.perf_counter() - self.t0)

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            if len(ends) == warmup:
                phases.totals.clear()

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=dtype == "bf16", fp16=False, seed=SEED,
            max_steps=warmup + steps, per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
            num_generations=GROUP, max_completion_length=TOKENS, temperature=1.0, top_p=1.0,
            generation_kwargs={"min_new_tokens": TOKENS},  # EOS masked until the budget is spent
            loss_type="grpo", beta=0.0, num_iterations=1, scale_rewards="group", epsilon=0.2,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            gradient_checkpointing=False,  # TRL's default (True) recomputes activations: slower
            disable_dropout=True, shuffle_dataset=False, dataloader_num_workers=0,
            report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, log_completions=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=correct, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[StepClock()])
        assert args.generation_batch_size == PROMPTS * GROUP and args.steps_per_generation == 1
        ids = trainer._tokenize_prompts(messages)[0]  # the same prompt tokens as keel's
        assert [list(i) for i in ids] == [render_prompt(tokenizer, ex.question) for ex in examples]
        if profile:  # the same pieces as keel's; the optimizer is timed by StepClock
            phases.wrap(trainer, "_generate_single_turn", "generate")
            phases.wrap(task, "reward", "reward")
            phases.wrap(trainer, "_compute_loss", "logprob_forward")
            phases.wrap(trainer.accelerator, "backward", "backward")
            phases.wrap(trainer, "_clip_grad_norm", "grad_clip")
        start = time.perf_counter()
        trainer.train()
    assert len(ends) == warmup + steps and sum(seen) == (warmup + steps) * PROMPTS * GROUP * TOKENS
    ends = [start] + ends
    out = {"step_s": [b - a for a, b in zip(ends, ends[1:])], "timed_s": ends[-1] - ends[warmup],
           "tokens": steps * PROMPTS * GROUP * TOKENS, "rss_mb": peak_rss_mb()}
    if profile:
        out["phases_s"] = with_other(phases.per_step(steps), out["timed_s"] / steps)
    return out


# ----------------------------------------------------------------------------- driver


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.side in ("keel", "keel_rollout"):
        rollout = args.keel_rollout if args.side == "keel_rollout" else None
        out = run_keel(args.model_dir, args.warmup, args.steps, args.profile, not args.keel_eager, args.dtype,
                       rollout, args.keel_correction, args.reward, args.keel_async_steps)
    else:
        out = run_trl(args.model_dir, args.warmup, args.steps, args.profile, args.reward, args.dtype)
    print(json.dumps(out))


def spawn(side: str, model_dir: str, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, __file__, "--side", side, "--model-dir", model_dir, "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype,
           "--reward", args.reward] + (
           ["--profile"] if args.profile else []) + (["--keel-eager"] if args.keel_eager else []) + (
           ["--keel-rollout", args.keel_rollout, "--keel-correction", args.keel_correction,
            "--keel-async-steps", str(args.keel_async_steps)] if args.keel_rollout else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the {side} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_sides(name: str, tmp: str, sides: list[str], spawn, args) -> tuple[dict, dict]:
    """Build model `name` in `tmp`, run every side `args.repeats` times in its own process
    (`spawn(side, model_dir, args)`), rotating who goes first; (the model's shape and each side's
    medians, each side's runs)."""
    from keel.models import init_model, save_model

    layers, hidden = MODELS[name]
    model, tokenizer = init_model("qwen3", layers=layers, hidden=hidden, seed=SEED)
    params = sum(p.numel() for p in model.parameters())
    model_dir = save_model(model, tokenizer, Path(tmp) / name)
    del model
    print(f"[{name}] qwen3 {layers} layers x {hidden} hidden: {params / 1e6:.2f}M params", file=sys.stderr)
    runs = {side: [] for side in sides}
    for r in range(args.repeats):
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:  # rotate who goes first
            res = spawn(side, str(model_dir), args)
            runs[side].append(res)
            print(f"[{name}] repeat {r + 1}/{args.repeats} {side:<12}: {res['tokens'] / res['timed_s']:7.1f} tok/s, "
                  f"{res['timed_s'] / args.steps:.2f} s/step, peak RSS {res['rss_mb']:.0f} MB", file=sys.stderr)
    out = {"params": params, "layers": layers, "hidden": hidden}
    for side, rs in runs.items():
        out[f"{side}_tok_s"] = statistics.median(r["tokens"] / r["timed_s"] for r in rs)
        out[f"{side}_step_s"] = statistics.median(r["timed_s"] / args.steps for r in rs)
        out[f"{side}_rss_mb"] = statistics.median(r["rss_mb"] for r in rs)
        out[f"{side}_tok_s_runs"] = [round(r["tokens"] / r["timed_s"], 1) for r in rs]
    return out, runs


def bench_model(name: str, tmp: str, args) -> dict:
    out, runs = run_sides(name, tmp, list(SIDES if args.keel_rollout else SIDES[:2]), spawn, args)
    for side, rs in runs.items():
        if side != "trl":
            out[f"{side}_rows_skipped"] = statistics.median(r["rows_skipped"] for r in rs)
    out["ratio"] = out["keel_tok_s"] / out["trl_tok_s"]
    out["ratio_runs"] = [round(t["timed_s"] / k["timed_s"], 3) for k, t in zip(runs["keel"], runs["trl"])]  # same tokens
    if "keel_rollout" in runs:
        out["ratio_rollout"] = out["keel_rollout_tok_s"] / out["trl_tok_s"]
    out["best_ratio"] = max(out["ratio"], out.get("ratio_rollout", 0.0))
    if args.profile:
        for side, rs in runs.items():
            out[f"{side}_phases_s"] = {k: statistics.median(r["phases_s"][k] for r in rs) for k in rs[0]["phases_s"]}
    return out


def best_side(r: dict) -> str:
    """keel's faster side on one model."""
    return "keel_rollout" if r.get("ratio_rollout", 0.0) > r["ratio"] else "keel"


def rounded(d: dict) -> dict:
    return {k: rounded(v) if isinstance(v, dict) else round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["27m", "3m", "both"], default="both")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating; medians are reported")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on both sides")
    p.add_argument("--profile", action="store_true", help="also time the phases of each side's step")
    p.add_argument("--keel-eager", action="store_true", help="keel without its compiled decode step")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="both sides' training precision: bf16 autocast pays on CPUs with AVX512_BF16 or AMX")
    p.add_argument("--keel-rollout", metavar="SPEC", help="also run keel sampling on this backend, e.g. "
                   "onnxruntime:cpu:fp32 or onnxruntime:cpu:int8 (RLConfig's rollout section)")
    p.add_argument("--keel-correction", default="tis", choices=["tis", "icepop", "seq_mask", "none"],
                   help="the off-policy correction of the --keel-rollout side")
    p.add_argument("--keel-async-steps", type=int, default=0, choices=[0, 1],
                   help="async_steps of the --keel-rollout side (1: sampling overlaps training, one step behind)")
    p.add_argument("--reward", choices=["verifier", "hash"], default="verifier",
                   help="verifier: keel's (all 0 on random weights, so keel skips every row's update); "
                   "hash: 0/1 from a hash of the text, so both sides run the whole update")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side's run
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.threads < 1:
        p.error("--steps, --repeats and --threads must be >= 1, --warmup >= 0")
    if args.side:
        return child(args)
    if args.keel_rollout:  # a spec this keel cannot sample on fails here, before anything runs
        from keel.errors import KeelError

        try:
            rollout_settings(args.keel_rollout, args.keel_correction, args.keel_async_steps)
        except KeelError as e:
            p.error(f"--keel-rollout {args.keel_rollout}: {e}")

    names = list(MODELS) if args.model == "both" else [args.model]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = bench_model(name, tmp, args)

    sides = SIDES if args.keel_rollout else SIDES[:2]
    label = {"keel": "keel", "trl": "TRL", "keel_rollout": f"keel, {args.keel_rollout} + {args.keel_correction}"
             + (" + async" if args.keel_async_steps else "")}
    print(f"reward: {args.reward}; 'rows skipped': share of rows keel left out of the update (zero advantage, beta 0)")
    print(f"{'model':<6}{'params':>8}  {'side':<40}{'tok/s':>9}{'vs TRL':>8}{'s/step':>8}{'peak RSS MB':>13}"
          f"{'rows skipped':>14}")
    for name, r in results.items():
        for side in sides:
            skipped = f"{r[f'{side}_rows_skipped']:.2f}" if f"{side}_rows_skipped" in r else "-"
            print(f"{name:<6}{r['params'] / 1e6:>7.1f}M  {label[side]:<40}{r[f'{side}_tok_s']:>9.1f}"
                  f"{r[f'{side}_tok_s'] / r['trl_tok_s']:>8.2f}{r[f'{side}_step_s']:>8.2f}{r[f'{side}_rss_mb']:>13.0f}"
                  f"{skipped:>14}")
    if args.profile:
        print(f"\nseconds per step{'':<14}" + "".join(f"{k:>16}" for k in (*PHASES, "other")))
        for name, r in results.items():
            for side in sides:
                p = r[f"{side}_phases_s"]
                print(f"{name + ' ' + side:<30}" + "".join(f"{p.get(k, 0.0):>16.3f}" for k in (*PHASES, "other")))
    import torch
    import trl

    print(json.dumps({
        "benchmark": "grpo_vs_trl", "trl": trl.__version__, "torch": torch.__version__, "threads": args.threads,
        "keel_compile": not args.keel_eager, "dtype": args.dtype,
        "reward": args.reward, "keel_rollout": args.keel_rollout,
        "keel_correction": args.keel_correction if args.keel_rollout else None,
        "keel_async_steps": args.keel_async_steps,
        "prompts_per_step": PROMPTS, "group_size": GROUP, "completion_tokens": TOKENS,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "models": {n: rounded(r) for n, r in results.items()},
        "min_ratio": round(min(r["ratio"] for r in results.values()), 3),
        "min_best_ratio": round(min(r["best_ratio"] for r in results.values()), 3),  # keel's faster side per model
        "goal_ratio": 2.0,
        "goal_met": all(r["best_ratio"] >= 2 and r[f"{best_side(r)}_rss_mb"] <= r["trl_rss_mb"]
                        for r in results.values()),
    }))


if __name__ == "__main__":
    main()
