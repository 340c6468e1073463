"""One GRPO step and one SFT step on the Qwen3-0.6B shape on an accelerator, with peak device memory.

Run by benchmarks/gpu_check.sh on a machine with a GPU (or an NPU, XPU: whatever torch.accelerator
reports). The model is built at random init with `init_model(preset="0.6b")` (Qwen's 151,667-token
BPE vocabulary, read offline from the dashscope package), bf16 autocast. The GRPO step is the
real-size one: 8 prompts x 8 samples x 1,024 new tokens (EOS never ends a sample), trained with
keel's defaults for memory (micro-batches, the chunked LM head, padding-free, gradient
checkpointing as in recipes/qwen3-0.6b.yaml). Prints a table, then one JSON line.

    .venv/bin/python benchmarks/gpu_steps.py [--completion-tokens 1024] [--sft-batch-tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def peak_gb() -> float:
    return torch.accelerator.max_memory_allocated() / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--completion-tokens", type=int, default=1024)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--sft-batch-tokens", type=int, default=16384)
    args = p.parse_args()
    if not torch.accelerator.is_available():
        raise SystemExit("no accelerator: this benchmark measures device memory (run it on a GPU machine)")

    from keel.config import RLConfig, SFTConfig
    from keel.models import init_model
    from keel.rl.trainer import RLTrainer
    from keel.train.sft import SFTTrainer

    model, tokenizer = init_model("qwen3", preset="0.6b")
    params = sum(q.numel() for q in model.parameters())
    rows = {}

    torch.accelerator.reset_peak_memory_stats()
    cfg = RLConfig(task="arithmetic", task_options={"digits": 3}, prompts_per_step=args.prompts,
                   group_size=args.group_size, max_new_tokens=args.completion_tokens, dtype="bf16", device="auto",
                   gradient_checkpointing=True, padding_free=True, lr=1e-6, steps=1)
    trainer = RLTrainer(model, tokenizer, cfg)
    trainer.eos_id = -1  # every sample runs the whole budget: the memory a real 1,024-token trace costs
    t0 = time.perf_counter()
    row = trainer.step()
    torch.accelerator.synchronize()
    rows["grpo"] = {"peak_gb": peak_gb(), "step_s": time.perf_counter() - t0, "rollout_s": row["rollout_s"]}
    del trainer

    model, tokenizer = init_model("qwen3", preset="0.6b")
    torch.accelerator.reset_peak_memory_stats()
    trainer = SFTTrainer(model, tokenizer, SFTConfig(task="arithmetic", task_options={"digits": 3}, examples=2000,
                                                     batch_tokens=args.sft_batch_tokens, dtype="bf16", device="auto",
                                                     gradient_checkpointing=True, steps=1, warmup=0))
    t0 = time.perf_counter()
    row = trainer.step()
    torch.accelerator.synchronize()
    rows["sft"] = {"peak_gb": peak_gb(), "step_s": time.perf_counter() - t0, "tokens": row["tokens"]}

    floor_gb = 16 * params / 2**30  # fp32 weights + gradients + AdamW's two moments
    print(f"{'step':<6}{'peak GB':>10}{'step s':>9}   (weights + grads + AdamW floor {floor_gb:.1f} GB, "
          f"{params / 1e6:.0f}M params, {torch.accelerator.current_accelerator()})")
    for name, r in rows.items():
        print(f"{name:<6}{r['peak_gb']:>10.2f}{r['step_s']:>9.1f}")
    print(json.dumps({"benchmark": "gpu_steps", "device": str(torch.accelerator.current_accelerator()),
                      "params": params, "floor_gb": round(floor_gb, 2),
                      "prompts": args.prompts, "group_size": args.group_size,
                      "completion_tokens": args.completion_tokens, "sft_batch_tokens": args.sft_batch_tokens,
                      **{f"{k}_{m}": round(v, 3) for k, r in rows.items() for m, v in r.items()}}))


if __name__ == "__main__":
    main()
