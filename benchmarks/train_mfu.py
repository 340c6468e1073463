"""SFT step FLOP/s as a share of this machine's measured matmul peak (model FLOPs utilisation).

Runs keel's SFT step as the trainer runs it (`SFTTrainer`: packed batch -> completion_loss ->
backward -> clip -> AdamW step) on a fresh local Qwen3 (8 layers x 512, ~27M parameters) on the
arithmetic task, and measures the peak in the same process: the best of a few large square
matmuls in the training dtype (keel's choice: bf16 where the device has it, else fp32), on the
same threads, once before and once after the timed steps.

FLOPs per step, PaLM's count (Chowdhery et al. 2022, appendix B; nanoGPT's `estimate_mfu`):
  6 * N * tokens + 12 * L * H * Q * sum(S_i ** 2)
N counts the weights that multiply (every nn.Linear, the tied lm_head included; the embedding is a
lookup and norms are elementwise), `tokens` the real (non-pad) tokens, L layers, H heads of Q dims,
S_i the length of each packed sequence: attention is per sequence, not per packed row, and is
counted non-causally as PaLM does. Padding and the work masked out of a row are not useful FLOPs.
mfu = achieved FLOP/s (median step) / peak FLOP/s (best matmul).

    .venv/bin/python benchmarks/train_mfu.py                  # keel's defaults: batch_tokens 4096, all cores
    .venv/bin/python benchmarks/train_mfu.py --batch-tokens 16384 --compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from keel.config import SFTConfig
from keel.device import pick_device, supports_bf16, synchronize
from keel.models import init_model, special_ids
from keel.train.sft import SFTTrainer

from common import peak_rss_mb

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of the best of `repeats` n x n matmuls."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def sequence_lengths(position_ids_BT: torch.Tensor, input_ids_BT: torch.Tensor, pad_id: int) -> list[int]:
    """Lengths of the packed sequences (positions restart at 0 for each), pad tails left out."""
    lengths = []
    for pos, ids in zip(position_ids_BT.tolist(), input_ids_BT.tolist()):
        starts = [t for t, p in enumerate(pos) if p == 0] + [len(pos)]
        lengths += [e - s for s, e in zip(starts, starts[1:]) if any(i != pad_id for i in ids[s:e])]
    return lengths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="qwen3")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=SFTConfig.batch_tokens, help="SFTConfig.batch_tokens")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, training and peak")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16 (SFTConfig.dtype)")
    p.add_argument("--peak-size", type=int, default=0, help="matmul size for the peak (default 2048 on cpu, else 8192)")
    p.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype_name = ("bf16" if supports_bf16(device) else "fp32") if args.dtype == "auto" else args.dtype
    n_peak = args.peak_size or (2048 if device.type == "cpu" else 8192)

    model, tokenizer = init_model(args.arch, layers=args.layers, hidden=args.hidden, seed=0)
    cfg = model.config
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or head_dim
    if args.compile:
        model.compile()
    trainer = SFTTrainer(model, tokenizer, SFTConfig(
        task="arithmetic", task_options={"digits": 3}, batch_tokens=args.batch_tokens,
        steps=args.warmup + args.steps, device=str(device), dtype=dtype_name))
    _, pad_id = special_ids(tokenizer)
    print(f"{args.arch} {args.layers}x{args.hidden}: {n_matmul / 1e6:.1f}M matmul weights, {device}, {dtype_name}, "
          f"{args.threads} threads, batch_tokens {args.batch_tokens}", file=sys.stderr)

    peaks = [peak_flops(device, DTYPES[dtype_name], n_peak, args.peak_repeats)]
    steps = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = trainer.batches.next()  # what trainer.step() does, minus the lr schedule
        row = trainer.update(batch)
        dt = time.perf_counter() - t0
        lengths = sequence_lengths(batch.position_ids_BT, batch.input_ids_BT, pad_id)
        flops = 6 * n_matmul * sum(lengths) + 12 * args.layers * heads * head_dim * sum(s * s for s in lengths)
        print(f"step {i + 1}: {dt:.2f} s, loss {row['loss']:.3f}" + (" (warm-up)" if i < args.warmup else ""),
              file=sys.stderr)
        if i >= args.warmup:
            steps.append({"s": dt, "flops": flops, "tokens": sum(lengths), "padded": batch.input_ids_BT.numel(),
                          "rows": batch.input_ids_BT.shape[0], "row_len": batch.input_ids_BT.shape[1]})
    peaks.append(peak_flops(device, DTYPES[dtype_name], n_peak, args.peak_repeats))

    step_s = statistics.median(s["s"] for s in steps)
    flops = statistics.mean(s["flops"] for s in steps)
    tokens = statistics.mean(s["tokens"] for s in steps)
    peak = max(peaks)
    result = {
        "benchmark": "train_mfu", "model": f"{args.arch} {args.layers}x{args.hidden}", "matmul_params": n_matmul,
        "device": str(device), "dtype": dtype_name, "threads": args.threads, "compile": args.compile,
        "batch_tokens": args.batch_tokens, "rows": steps[0]["rows"], "row_len": steps[0]["row_len"],
        "tokens_per_step": tokens, "pad_fraction": 1 - tokens / statistics.mean(s["padded"] for s in steps),
        "step_s": step_s, "step_s_best": min(s["s"] for s in steps), "tokens_per_s": tokens / step_s,
        "gflop_per_step": flops / 1e9, "achieved_gflops": flops / step_s / 1e9, "peak_gflops": peak / 1e9,
        "peak_gflops_runs": [round(x / 1e9, 1) for x in peaks], "peak_matmul_size": n_peak,
        "mfu": flops / step_s / peak, "mfu_best_step": flops / min(s["s"] for s in steps) / peak,
        "peak_rss_mb": peak_rss_mb(),
    }
    print(f"{'':<22}{'value':>12}")
    for label, key, fmt in (("tokens / step", "tokens_per_step", ".0f"), ("pad fraction", "pad_fraction", ".3f"),
                            ("step s (median)", "step_s", ".3f"), ("tokens / s", "tokens_per_s", ".0f"),
                            ("GFLOP / step", "gflop_per_step", ".1f"), ("achieved GFLOP/s", "achieved_gflops", ".1f"),
                            ("peak GFLOP/s", "peak_gflops", ".1f"), ("MFU", "mfu", ".3f"),
                            ("peak RSS MB", "peak_rss_mb", ".0f")):
        print(f"{label:<22}{result[key]:>12{fmt}}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
