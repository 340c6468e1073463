"""Peak memory of real-size training steps: keel vs TRL, same machine, model and work.

Three parts (`--only`), every run in its own subprocess, one at a time, so each peak RSS (VmHWM)
is that run's own:

  0.6b   The Qwen3-0.6B shape at random init (keel.models.init_model("qwen3", preset="0.6b"):
         596M parameters, Qwen's real 151,667-token BPE vocabulary, offline), saved once to a temp
         folder and loaded by every run with transformers, fp32 on the CPU.
         GRPO: one optimizer step on 4 prompts x 8 samples x `--completion-tokens` (512) tokens,
         EOS never ends a sample (keel: `trainer.eos_id = -1`; TRL: min_new_tokens), beta 0, one
         update per batch, the same arithmetic prompts as grpo_vs_trl.py. keel at its defaults
         (RLConfig: micro_batch_tokens 16384, the LM head in chunks past the logits budget,
         gradient checkpointing on as for every model of 100M+ parameters), keel with LoRA
         (RLConfig.lora = LoraSpec(): r 16 on every linear layer), and either with checkpointing
         off (`--keel-rl no_ckpt,lora_no_ckpt`) to show what it saves;
         TRL 1.16's GRPOTrainer at its own defaults that fit: gradient checkpointing on (TRL's
         default), per_device_train_batch_size 1 (the smallest: TRL only needs
         generation_batch_size divisible by num_generations) with gradient_accumulation_steps
         32, so generation_batch_size = 32 and steps_per_generation = 32: all 32 completions
         generated in one batch, then 32 one-row forward/backwards and one optimizer step.
         SFT: one optimizer step on batch_tokens 4096 of packed arithmetic traces (keel's
         SFTTrainer: rows of 256 tokens), keel at its defaults and without gradient
         checkpointing, against TRL's SFTTrainer on the same traces (pre-tokenized, loss on the
         completions only, packing "bfd" into one row of max_length 4096, batch 1, TRL's
         default gradient checkpointing).
  small  keel alone: a 2-layer Qwen3 (hidden `--small-hidden`, 1024 by default: the 0.6B's width
         and MLP) with Qwen's vocabulary, one RL update (GRPO) over a hand-built batch of 32
         completions x 1,024 tokens (no generation), keel's defaults; the same update without
         gradient checkpointing; and with the chunked LM head turned off (keel.engine.head.LOGITS_BUDGET raised past any
         batch inside that child) to show what the chunking saves.

Beside each peak: the floor, 16 bytes per trained parameter (fp32 weights, gradients and both
AdamW moments) plus 4 per frozen one (LoRA's base weights). Each run also reports where its peak
is: the peak RSS of each phase (load, generate, training forward+backward, optimizer step),
measured by resetting VmHWM (/proc/self/clear_refs) between phases.

Memory guard: the driver polls each child's RSS and kills it when it passes `--max-rss-gb`
(default: the memory available when the child starts, less 1.5 GB) or the machine's available
memory falls under 0.75 GB; that run's peak is then shown as ">N" (a lower bound) and its ratio
is a lower bound too. Every child does `--steps` steps (1) and is also killed past
`--child-timeout` seconds. Progress lines (start, heartbeat, end with wall time and peak) go to
stderr; the table goes to stdout, then one JSON line last.

Needs the bench extra (TRL): `.venv/bin/python -m pip install -e ".[bench]"`.

    .venv/bin/python benchmarks/memory_vs_trl.py --threads 2 --only small
    .venv/bin/python benchmarks/memory_vs_trl.py --threads 2 --only 0.6b [--completion-tokens 256]
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
from grpo_vs_trl import LR, SEED, TASK, bench_prompts

PROMPTS, GROUP, TOKENS = 4, 8, 512   # GRPO step: 4 prompts x 8 samples x 512 completion tokens
SFT_TOKENS, SFT_EXAMPLES = 4096, 1000  # SFT step: batch_tokens of packed traces, drawn from this many
SMALL_LAYERS, SMALL_HIDDEN, SMALL_ROWS, SMALL_TOKENS = 2, 1024, 32, 1024
SMALL_GOAL_MB = 6 * 1024             # "under 6 GB" (MB here are MiB, as VmHWM's kB / 1024)
RATIO_GOAL = 0.6                     # keel's GRPO peak at most 0.6x TRL's (full fine-tune or LoRA)
NO_BUDGET = 1 << 62                  # a logits budget no batch reaches: the LM head in one piece
# keel's default checkpointing (None) is on for models of 100M+ parameters: every run here but "no_ckpt"
KEEL_RL = {"default": {}, "no_ckpt": {"gradient_checkpointing": False}, "lora": {"lora": True},
           "lora_no_ckpt": {"lora": True, "gradient_checkpointing": False}}
KEEL_SFT = {"default": {}, "no_ckpt": {"gradient_checkpointing": False}}


# ----------------------------------------------------------------------------- in a child


class Peaks:
    """The peak RSS of each named phase: `mark(name)` charges the peak since the last mark to
    `name`, then resets VmHWM to the current RSS (writing 5 to /proc/self/clear_refs). Where the
    kernel refuses the reset, each phase holds the peak so far (the largest is still the run's)."""

    def __init__(self):
        self.mb: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.mb[name] = max(self.mb.get(name, 0.0), peak_rss_mb())
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def around(self, owner, attr: str, before: str, after: str) -> None:
        """Mark `before` when owner.attr is called and `after` when it returns."""
        fn = getattr(owner, attr)

        def wrapped(*a, **k):
            self.mark(before)
            try:
                return fn(*a, **k)
            finally:
                self.mark(after)
        setattr(owner, attr, wrapped)


def log(msg: str) -> None:
    print(f"[memory_vs_trl] {msg}", file=sys.stderr, flush=True)


def param_counts(model) -> tuple[int, int]:
    """(trained, frozen) parameters; a tied embedding counts once."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trained, sum(p.numel() for p in model.parameters()) - trained


def floor_mb(trained: int, frozen: int) -> float:
    """fp32 weights + gradients + AdamW's two moments for the trained parameters, weights alone
    for the frozen ones."""
    return (16 * trained + 4 * frozen) / 2**20


def child_build(model_dir: str) -> dict:
    from keel.models import init_model, save_model

    model, tokenizer = init_model("qwen3", preset="0.6b", seed=SEED)
    save_model(model, tokenizer, model_dir)
    return {"params": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer)}


def keel_rl_config(variant: str, tokens: int, steps: int, **changes):
    from keel.config import RLConfig

    opts = dict(KEEL_RL[variant])
    if opts.pop("lora", False):
        from keel.config import LoraSpec

        opts["lora"] = LoraSpec()
    return RLConfig(task="arithmetic", task_options=TASK, loss="grpo", steps=steps, prompts_per_step=PROMPTS,
                    group_size=GROUP, updates_per_batch=1, lr=LR, temperature=1.0, max_new_tokens=tokens, beta=0.0,
                    format_weight=0.0, seed=SEED, device="cpu", dtype="fp32", **opts, **changes)


def child_keel_rl(model_dir: str, variant: str, tokens: int, steps: int, peaks: Peaks) -> dict:
    from keel.models import load_model
    from keel.rl.trainer import RLTrainer

    model, tokenizer = load_model(model_dir)
    peaks.mark("load")
    trainer = RLTrainer(model, tokenizer, keel_rl_config(variant, tokens, steps))
    del model
    trainer.eos_id = -1  # an id the sampler never draws: every sample runs to max_new_tokens
    peaks.around(trainer, "collect", "setup", "generate")
    peaks.around(trainer.optimizer, "step", "train_fwd_bwd", "optimizer")
    for _ in range(steps):
        row = trainer.step()
        assert row["groups"] == PROMPTS and row["response_length"] == tokens and "skipped" not in row, row
    return {"params": param_counts(trainer.model), "micro_batch_tokens": trainer.cfg.micro_batch_tokens,
            "tokens": steps * PROMPTS * GROUP * tokens}


def child_trl_rl(model_dir: str, tokens: int, steps: int, peaks: Peaks) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from keel.models import load_model, render_prompt

    model, tokenizer = load_model(model_dir)
    peaks.mark("load")
    task, examples = bench_prompts(PROMPTS * steps)
    messages = [[{"role": "user", "content": ex.question}] for ex in examples]
    dataset = Dataset.from_dict({"prompt": messages, "idx": list(range(len(examples)))})
    seen, generated = [], []

    def correct(prompts, completions, completion_ids, idx, **_):
        assert all(len(c) == tokens for c in completion_ids), [len(c) for c in completion_ids]
        seen.append(len(completion_ids))
        return [task.reward(c[0]["content"], examples[i])["correct"] for c, i in zip(completions, idx)]

    class Marks(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            peaks.mark("train_fwd_bwd")

        def on_optimizer_step(self, args, state, control, **kwargs):
            peaks.mark("optimizer")

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, fp16=False, seed=SEED, max_steps=steps,
            per_device_train_batch_size=1, gradient_accumulation_steps=PROMPTS * GROUP,  # the smallest batch
            num_generations=GROUP, max_completion_length=tokens, temperature=1.0, top_p=1.0,
            generation_kwargs={"min_new_tokens": tokens},  # EOS masked until the budget is spent
            loss_type="grpo", beta=0.0, num_iterations=1, scale_rewards="group", epsilon=0.2,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            disable_dropout=True, shuffle_dataset=False, dataloader_num_workers=0,
            report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, log_completions=False,
        )  # gradient_checkpointing left at TRL's default
        trainer = GRPOTrainer(model=model, reward_funcs=correct, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Marks()])
        del model
        assert args.gradient_checkpointing, "TRL's default gradient checkpointing is expected on"
        assert args.generation_batch_size == PROMPTS * GROUP and args.steps_per_generation == PROMPTS * GROUP, \
            (args.generation_batch_size, args.steps_per_generation)
        ids = trainer._tokenize_prompts(messages)[0]  # the same prompt tokens as keel's
        assert [list(i) for i in ids] == [render_prompt(tokenizer, ex.question) for ex in examples]
        generate = trainer._generate_single_turn

        def counted(prompts, *a, **k):
            generated.append(len(prompts))
            return generate(prompts, *a, **k)
        trainer._generate_single_turn = counted
        peaks.around(trainer, "_generate_single_turn", "setup", "generate")
        trainer.train()
        params = param_counts(trainer.model)
    # one generation call of all 32 completions per step, every completion the full budget
    assert generated == [PROMPTS * GROUP] * steps and sum(seen) == steps * PROMPTS * GROUP, (generated, seen)
    return {"params": params, "tokens": steps * PROMPTS * GROUP * tokens,
            "settings": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": PROMPTS * GROUP,
                         "generation_batch_size": args.generation_batch_size,
                         "steps_per_generation": args.steps_per_generation,
                         "gradient_checkpointing": args.gradient_checkpointing}}


def keel_sft_config(variant: str, steps: int):
    from keel.config import SFTConfig

    return SFTConfig(task="arithmetic", task_options=TASK, examples=SFT_EXAMPLES, steps=steps,
                     batch_tokens=SFT_TOKENS, lr=LR, warmup=0, seed=SEED, device="cpu", dtype="fp32",
                     **KEEL_SFT[variant])


def child_keel_sft(model_dir: str, variant: str, steps: int, peaks: Peaks) -> dict:
    from keel.models import load_model
    from keel.train.sft import SFTTrainer

    model, tokenizer = load_model(model_dir)
    peaks.mark("load")
    trainer = SFTTrainer(model, tokenizer, keel_sft_config(variant, steps))
    del model
    shapes, tokens = [], 0
    nxt = trainer.batches.next

    def recorded():
        batch = nxt()
        shapes.append(list(batch.input_ids_BT.shape))
        return batch
    trainer.batches.next = recorded
    peaks.around(trainer.optimizer, "step", "train_fwd_bwd", "optimizer")
    peaks.mark("setup")
    for _ in range(steps):
        row = trainer.step()
        assert "skipped" not in row, row
        tokens += row["tokens"]
    return {"params": param_counts(trainer.model), "rows_x_len": shapes, "completion_tokens": tokens}


def keel_sft_pairs(tokenizer, steps: int) -> list[list[tuple[list[int], list[int]]]]:
    """The (prompt, completion) pairs of keel's first `steps` SFT batches, in its order."""
    from keel.tasks import get_task
    from keel.train.sft import Batches, encode_traces

    cfg = keel_sft_config("default", steps)
    pairs = encode_traces(tokenizer, get_task(cfg.task, **cfg.task_options).examples("train", cfg.examples,
                                                                                      seed=cfg.seed))
    batches, out = Batches(pairs, cfg.batch_tokens, 0, cfg.seed), []
    for _ in range(steps):
        start, chosen = batches.cursor, []
        batches.next()  # advances the cursor past the batch's pairs
        for i in range(start, batches.cursor):
            chosen.append(batches.items[batches._order[i]])
        out.append(chosen)
    return out


def child_trl_sft(model_dir: str, steps: int, peaks: Peaks) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from keel.models import load_model

    model, tokenizer = load_model(model_dir)
    peaks.mark("load")
    pairs = [pair for batch in keel_sft_pairs(tokenizer, steps) for pair in batch]
    dataset = Dataset.from_dict({"input_ids": [p + c for p, c in pairs],
                                 "labels": [[-100] * len(p) + c for p, c in pairs]})  # loss on completions

    class Marks(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            peaks.mark("train_fwd_bwd")

        def on_optimizer_step(self, args, state, control, **kwargs):
            peaks.mark("optimizer")

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, use_cpu=True, bf16=False, fp16=False, seed=SEED, max_steps=steps,
            per_device_train_batch_size=1, gradient_accumulation_steps=1, max_length=SFT_TOKENS, packing=True,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            dataloader_num_workers=0, report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        )  # gradient_checkpointing left at TRL's default
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[Marks()])
        del model
        assert args.gradient_checkpointing, "TRL's default gradient checkpointing is expected on"
        packed = [len(r) for r in trainer.train_dataset["input_ids"]]
        assert max(packed) <= SFT_TOKENS, packed
        peaks.mark("setup")
        trainer.train()
        params = param_counts(trainer.model)
    return {"params": params, "packed_rows": packed[:steps],
            "completion_tokens": sum(len(c) for _, c in pairs)}


def small_batch(tokenizer, vocab: int):
    """32 completions x 1,024 tokens on arithmetic prompts, random ids, rewards half 0 half 1
    within each group (every group has signal), as tests/distributed/worker.py's rl_batch."""
    import torch

    from keel.models import render_prompt
    from keel.rl.trainer import Batch
    from keel.tasks import get_task

    g = torch.Generator().manual_seed(SEED)
    examples = get_task("arithmetic", **TASK).examples("train", SMALL_ROWS // GROUP, seed=SEED)
    prompts = [render_prompt(tokenizer, ex.question) for ex in examples for _ in range(GROUP)]
    completions = [torch.randint(0, vocab, (SMALL_TOKENS,), generator=g).tolist() for _ in prompts]
    rewards = torch.tensor([float(i % 2) for i in range(len(prompts))])
    return Batch(prompts, completions, rewards, rewards, torch.zeros_like(rewards),
                 torch.zeros(len(prompts), dtype=torch.bool), len(prompts))


def child_small(variant: str, hidden: int, steps: int, peaks: Peaks) -> dict:
    import keel.engine.head as head
    from keel.models import init_model
    from keel.rl.trainer import RLTrainer

    model, tokenizer = init_model("qwen3", layers=SMALL_LAYERS, hidden=hidden, tokenizer="qwen",
                                  max_positions=2 * SMALL_TOKENS, seed=SEED)
    peaks.mark("load")
    trainer = RLTrainer(model, tokenizer, keel_rl_config("no_ckpt" if variant == "no_ckpt" else "default",
                                                         SMALL_TOKENS, steps))
    del model
    if variant == "plain":
        head.LOGITS_BUDGET = NO_BUDGET  # this process only: the LM head in one piece
    batch = small_batch(tokenizer, min(tokenizer.vocab_size, trainer.model.config.vocab_size))
    micro = batch.micro_batches(trainer.cfg.micro_batch_tokens)
    chunked = head.chunked_head(trainer.model, len(micro[0]) * SMALL_TOKENS, head.LOGITS_BUDGET)
    assert chunked == (variant != "plain"), (variant, chunked)
    peaks.around(trainer.optimizer, "step", "train_fwd_bwd", "optimizer")
    peaks.mark("setup")
    for i in range(steps):
        trainer.step_idx = i
        row = trainer.update(batch)
        assert "skipped" not in row, row
    return {"params": param_counts(trainer.model), "vocab": trainer.model.config.vocab_size,
            "micro_batches": [len(m) for m in micro], "loss": row["loss"], "grad_norm": row["grad_norm"],
            "tokens": steps * SMALL_ROWS * SMALL_TOKENS}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    peaks = Peaks()
    t0 = time.perf_counter()
    kind, _, variant = args.child.partition(":")
    if kind == "build":
        out = child_build(args.model_dir)
    elif kind == "keel_rl":
        out = child_keel_rl(args.model_dir, variant, args.completion_tokens, args.steps, peaks)
    elif kind == "trl_rl":
        out = child_trl_rl(args.model_dir, args.completion_tokens, args.steps, peaks)
    elif kind == "keel_sft":
        out = child_keel_sft(args.model_dir, variant, args.steps, peaks)
    elif kind == "trl_sft":
        out = child_trl_sft(args.model_dir, args.steps, peaks)
    elif kind == "small":
        out = child_small(variant, args.small_hidden, args.steps, peaks)
    else:
        raise SystemExit(f"unknown child {args.child}")
    peaks.mark("end")
    out.update(phases_mb=peaks.mb, rss_mb=max(peaks.mb.values()), child_s=time.perf_counter() - t0)
    print(json.dumps(out))


# ----------------------------------------------------------------------------- driver


def meminfo_mb(key: str = "MemAvailable") -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/meminfo")


def proc_mb(pid: int, key: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def spawn(name: str, child_arg: str, args, model_dir: str = "") -> dict:
    """Run one child under the memory guard and the timeout; its JSON result, or one that says
    why it was stopped ("killed") or failed ("failed"), with the peak it had reached."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--child", child_arg, "--model-dir", model_dir, "--threads", str(args.threads),
           "--steps", str(args.steps), "--completion-tokens", str(args.completion_tokens),
           "--small-hidden", str(args.small_hidden)]
    available = meminfo_mb()
    limit = args.max_rss_gb * 1024 if args.max_rss_gb else available - 1536
    log(f"start {name}: limit {limit:.0f} MB RSS (available {available:.0f} MB), load {fmt_load(os.getloadavg())}")
    t0, seen, killed = time.perf_counter(), 0.0, None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        beat = t0
        while proc.poll() is None:
            time.sleep(0.1)
            rss = proc_mb(proc.pid, "VmRSS")
            seen = max(seen, rss, proc_mb(proc.pid, "VmHWM"))
            wall = time.perf_counter() - t0
            if rss > limit:
                killed = f"RSS {rss:.0f} MB passed the limit of {limit:.0f} MB"
            elif meminfo_mb() < 768:
                killed = f"the machine's available memory fell under 768 MB (child RSS {rss:.0f} MB)"
            elif wall > args.child_timeout:
                killed = f"ran past --child-timeout {args.child_timeout} s"
            if killed:
                proc.kill()
                proc.wait()
                break
            if time.perf_counter() - beat >= args.heartbeat:
                beat = time.perf_counter()
                log(f"  {name}: {wall:.0f} s, RSS {rss:.0f} MB (peak seen {seen:.0f}), load {fmt_load(os.getloadavg())}")
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if killed:
        log(f"end   {name}: KILLED after {wall:.0f} s ({killed}); peak at least {seen:.0f} MB")
        return {"killed": killed, "rss_mb": seen, "wall_s": wall}
    if proc.returncode:
        tail = stderr.strip()[-3000:]
        log(f"end   {name}: FAILED (exit {proc.returncode}) after {wall:.0f} s:\n{tail}")
        return {"failed": f"exit {proc.returncode}: {tail.splitlines()[-1] if tail else ''}", "rss_mb": seen,
                "wall_s": wall}
    res = json.loads(stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    log(f"end   {name}: {wall:.0f} s, peak RSS {res.get('rss_mb', 0):.0f} MB, load {fmt_load(os.getloadavg())}")
    return res


def fmt_load(load) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def run_part(names: list[tuple[str, str]], args, model_dir: str = "") -> dict[str, dict]:
    """Each (name, child) `--repeats` times, the order reversed every other repeat; per name the
    run of median peak (a run that was stopped counts with the peak it had reached)."""
    runs: dict[str, list[dict]] = {n: [] for n, _ in names}
    for r in range(args.repeats):
        for name, child_arg in names if r % 2 == 0 else names[::-1]:
            runs[name].append(spawn(f"{name} (repeat {r + 1}/{args.repeats})", child_arg, args, model_dir))
    out = {}
    for name, rs in runs.items():
        rs = sorted(rs, key=lambda x: x["rss_mb"])
        med = dict(rs[(len(rs) - 1) // 2])
        med["rss_mb"] = statistics.median(x["rss_mb"] for x in rs)
        med["rss_runs_mb"] = [round(x["rss_mb"]) for x in runs[name]]
        med["wall_runs_s"] = [round(x["wall_s"], 1) for x in runs[name]]
        med["lower_bound"] = any("killed" in x or "failed" in x for x in rs)
        out[name] = med
    return out


def has_lora() -> bool:
    from keel.config import RLConfig

    return "lora" in {f.name for f in dataclasses.fields(RLConfig)}


def peak_str(r: dict) -> str:
    if "failed" in r:
        return "failed"
    return f"{'>' if r['lower_bound'] else ''}{r['rss_mb']:.0f}"


def where(r: dict) -> str:
    if "phases_mb" not in r:
        return r.get("killed") or r.get("failed", "")
    phases = {k: v for k, v in r["phases_mb"].items() if k not in ("end",)}
    return "  ".join(f"{k} {v:.0f}" for k, v in phases.items())


def floor_of(r: dict) -> float | None:
    return floor_mb(*r["params"]) if "params" in r else None


def print_table(title: str, rows: dict[str, dict], floors: dict[str, float], ref: str | None) -> None:
    print(f"\n{title}")
    print(f"{'run':<22}{'peak MB':>10}{'floor MB':>10}{'peak/floor':>11}{'vs TRL':>8}{'wall s':>8}   peak RSS per phase, MB")
    for name, r in rows.items():
        fl = floors.get(name)
        ratio = ""
        if ref and name != ref and ref in rows and "failed" not in r and "failed" not in rows[ref]:
            ratio = f"{'>' if r['lower_bound'] else ''}{r['rss_mb'] / rows[ref]['rss_mb']:.2f}"
        pf = f"{r['rss_mb'] / fl:.2f}" if fl and "failed" not in r else ""
        print(f"{name:<22}{peak_str(r):>10}{(f'{fl:.0f}' if fl else ''):>10}{pf:>11}{ratio:>8}"
              f"{r['wall_s']:>8.0f}   {where(r)}")


def summary(rows: dict[str, dict], ref: str | None) -> dict:
    out = {}
    for name, r in rows.items():
        out[f"{name}_mb"] = None if "failed" in r else round(r["rss_mb"])
        out[f"{name}_lower_bound"] = r["lower_bound"]
        out[f"{name}_wall_s"] = round(r["wall_s"], 1)
        if "phases_mb" in r:
            out[f"{name}_phases_mb"] = {k: round(v) for k, v in r["phases_mb"].items()}
        for why in ("killed", "failed"):
            if why in r:
                out[f"{name}_{why}"] = r[why]
        if ref and name != ref and ref in rows and out[f"{name}_mb"] and out.get(f"{ref}_mb"):
            out[f"ratio_{name}_{ref}"] = round(r["rss_mb"] / rows[ref]["rss_mb"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["small", "0.6b", "all"], default="all")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=1, help="runs of each, alternating the order; medians reported")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every run")
    p.add_argument("--completion-tokens", type=int, default=TOKENS, help="GRPO tokens per sample, both sides")
    p.add_argument("--small-hidden", type=int, default=SMALL_HIDDEN, help="width of the 2-layer model")
    p.add_argument("--keel-rl", default="default,lora",
                   help=f"keel GRPO variants at 0.6B, comma-separated, of {', '.join(KEEL_RL)}")
    p.add_argument("--no-sft", action="store_true", help="skip the 0.6B SFT runs")
    p.add_argument("--no-trl-sft", action="store_true", help="keel's side only of the 0.6B SFT step")
    p.add_argument("--max-rss-gb", type=float, default=0.0,
                   help="kill a run whose RSS passes this (0: the memory available at its start less 1.5 GB)")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds before a run is killed")
    p.add_argument("--heartbeat", type=float, default=60.0, help="seconds between progress lines of a run")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one run
    p.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 1 or args.repeats < 1 or args.threads < 1 or args.completion_tokens < 1:
        p.error("--steps, --repeats, --threads and --completion-tokens must be >= 1")
    if args.child:
        return child(args)
    variants = [v for v in args.keel_rl.split(",") if v]
    if bad := [v for v in variants if v not in KEEL_RL]:
        p.error(f"--keel-rl: unknown {bad}; choose from {', '.join(KEEL_RL)}")

    load_start, t_start = os.getloadavg(), time.perf_counter()
    log(f"load at start {fmt_load(load_start)}, {os.cpu_count()} CPUs, {meminfo_mb('MemTotal'):.0f} MB memory, "
        f"{meminfo_mb():.0f} MB available")
    report: dict = {}
    notes: list[str] = []
    if args.only in ("small", "all"):
        rows = run_part([("keel_chunked", "small:chunked"), ("keel_no_ckpt", "small:no_ckpt"),
                         ("keel_plain_head", "small:plain")], args)
        ok = "params" in rows["keel_chunked"]
        fl = floor_of(rows["keel_chunked"]) if ok else None
        print_table(f"RL update, {SMALL_LAYERS}-layer Qwen3 (hidden {args.small_hidden}, Qwen vocabulary), "
                    f"{SMALL_ROWS} completions x {SMALL_TOKENS} tokens, hand-built batch",
                    rows, {n: fl for n in rows} if fl else {}, None)
        small = summary(rows, None)
        chunked, plain = rows["keel_chunked"], rows["keel_plain_head"]
        small.update(layers=SMALL_LAYERS, hidden=args.small_hidden, rows=SMALL_ROWS, tokens=SMALL_TOKENS,
                     params=sum(chunked["params"]) if ok else None, vocab=chunked.get("vocab"),
                     micro_batches=chunked.get("micro_batches"), floor_mb=round(fl) if fl else None,
                     goal_mb=SMALL_GOAL_MB,
                     goal_met=bool(ok and not chunked["lower_bound"] and chunked["rss_mb"] < SMALL_GOAL_MB))
        if "failed" not in plain and "failed" not in chunked:
            small["chunking_saves_mb"] = round(plain["rss_mb"] - chunked["rss_mb"])
            small["chunking_saves_lower_bound"] = plain["lower_bound"]
        if ok and "loss" in plain:  # the saving is on the same numbers
            small["same_loss"] = abs(plain["loss"] - chunked["loss"]) <= 1e-4 * max(1.0, abs(chunked["loss"]))
        report["small"] = small

    if args.only in ("0.6b", "all"):
        if any(v.startswith("lora") for v in variants) and not has_lora():
            variants = [v for v in variants if not v.startswith("lora")]
            notes.append("RLConfig has no `lora` field yet: the keel LoRA row is skipped")
            log(notes[-1])
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = str(Path(tmp) / "qwen3-0.6b")
            built = spawn("build Qwen3-0.6B shape", "build", args, model_dir)
            if "params" not in built:
                raise SystemExit(f"building the 0.6B model failed: {built}")
            params = built["params"]
            log(f"Qwen3-0.6B shape: {params:,} parameters, vocabulary {built['vocab']:,}, built and saved in "
                f"{built['wall_s']:.0f} s")
            # TRL first: its wall time (the longest) is known early
            rl_names = [("trl", "trl_rl")] + [(f"keel_{v}", f"keel_rl:{v}") for v in variants]
            rl = run_part(rl_names, args, model_dir)
            sft = {}
            if not args.no_sft:
                sft_names = [(f"keel_{v}", f"keel_sft:{v}") for v in KEEL_SFT]
                sft_names += [] if args.no_trl_sft else [("trl", "trl_sft")]
                sft = run_part(sft_names, args, model_dir)
        full = floor_mb(params, 0)
        floors = {n: (floor_of(r) or full) for n, r in rl.items()}
        print_table(f"GRPO step, Qwen3-0.6B shape ({params / 1e6:.0f}M params), fp32, {PROMPTS} prompts x {GROUP} "
                    f"samples x {args.completion_tokens} tokens, {args.threads} threads", rl, floors, "trl")
        rl_out = summary(rl, "trl")
        rl_out.update(params=params, floor_mb=round(full), completion_tokens=args.completion_tokens,
                      trl_settings=rl["trl"].get("settings"))
        lora = [r for n, r in rl.items() if n.startswith("keel_lora") and "params" in r]
        if lora:
            rl_out.update(lora_adapter_params=lora[0]["params"][0], lora_floor_mb=round(floor_of(lora[0])))
        trl = rl["trl"]
        met = [n for n, r in rl.items() if n != "trl" and "failed" not in trl and not trl["lower_bound"]
               and "failed" not in r and not r["lower_bound"] and r["rss_mb"] <= RATIO_GOAL * trl["rss_mb"]]
        rl_out.update(goal_ratio=RATIO_GOAL, goal_met_by=met)
        if not trl["lower_bound"]:
            rl_out["floor_over_trl"] = round(full / trl["rss_mb"], 3)  # the best any full fine-tune can do
        report["rl_0.6b"] = rl_out
        if sft:
            print_table(f"SFT step, Qwen3-0.6B shape, fp32, {SFT_TOKENS} tokens of packed arithmetic traces",
                        sft, {n: (floor_of(r) or full) for n, r in sft.items()}, "trl" if "trl" in sft else None)
            sft_out = summary(sft, "trl" if "trl" in sft else None)
            sft_out.update(floor_mb=round(full), batch_tokens=SFT_TOKENS,
                           keel_rows_x_len=sft["keel_default"].get("rows_x_len"),
                           trl_packed_rows=sft.get("trl", {}).get("packed_rows"))
            report["sft_0.6b"] = sft_out

    import torch
    import transformers

    try:
        import trl as trl_pkg
        trl_version = trl_pkg.__version__
    except ImportError:
        trl_version = None
    load_end = os.getloadavg()
    log(f"load at end {fmt_load(load_end)}; total {time.perf_counter() - t_start:.0f} s")
    for n in notes:
        print(f"note: {n}")
    print(json.dumps({
        "benchmark": "memory_vs_trl", "trl": trl_version, "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": args.threads, "steps": args.steps,
        "repeats": args.repeats, "only": args.only, "mem_total_mb": round(meminfo_mb("MemTotal")),
        **report, "notes": notes, "load_start": [round(x, 2) for x in load_start],
        "load_end": [round(x, 2) for x in load_end], "total_s": round(time.perf_counter() - t_start, 1),
    }))


if __name__ == "__main__":
    main()
