"""Rollout decode throughput: keel's rollout engine vs transformers' `model.generate()`.

Same model (a fresh local Qwen3, ~27M parameters by default), same prompts (rendered arithmetic
questions), same sampling (temperature 1, top_p 1, no top_k), batch 32 x 64 new tokens. EOS is
kept out of the way on both sides so every row gets exactly 64 tokens: transformers gets
`min_new_tokens=64` (it masks EOS), keel gets `eos_id=-1` (an id that is never sampled); the
script checks both token counts.
Prompts are left-padded with an attention mask on both sides, as transformers expects.

Each side runs in its own worker process (so each peak RSS is its own), warms up, and then the
sides are timed in turn, `--repeats` times each; the table shows medians. A third worker times
the model's matmuls alone (every nn.Linear once per token step, on [batch, in] inputs, with the
same threads; no attention, no sampling): a floor that no engine running these fp32 matmuls on
this machine goes under, so `floor_tok_s / hf_tok_s` is about the largest ratio any could show. `--compile` adds a fourth worker, keel with
`generate(..., compile=True)`; its compile time is in its warm-up column, not in its tok/s.

    .venv/bin/python benchmarks/rollout_vs_hf.py
    .venv/bin/python benchmarks/rollout_vs_hf.py --compile
    .venv/bin/python benchmarks/rollout_vs_hf.py --hidden 256 --layers 4 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from common import peak_rss_mb

SIDES = ("keel", "hf", "floor", "keel_compiled")


def worker(side: str, args) -> None:
    """Build the model and prompts, warm up, then time one rollout per 'run' line on stdin."""
    import torch

    from keel.models import init_model, render_prompt
    from keel.engine.sampler import SamplingParams, generate
    from keel.tasks import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = init_model(args.arch, layers=args.layers, hidden=args.hidden, seed=0)
    model.eval()
    questions = [ex.question for ex in get_task("arithmetic").examples("test", args.batch, seed=0)]
    prompts = [render_prompt(tok, q) for q in questions]
    B, N, pad = len(prompts), args.new_tokens, tok.pad_token_id

    if side in ("keel", "keel_compiled"):
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=N)

        def once(seed: int) -> int:
            g = torch.Generator().manual_seed(seed)
            out = generate(model, prompts, params, eos_id=-1, pad_id=pad, generator=g, compile=side == "keel_compiled")
            return sum(len(t) for t in out.tokens)
    elif side == "hf":
        enc = tok.pad([{"input_ids": p} for p in prompts], padding_side="left", return_tensors="pt")

        def once(seed: int) -> int:
            torch.manual_seed(seed)  # transformers samples from the global RNG
            with torch.no_grad():
                out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=N,
                                     min_new_tokens=N, pad_token_id=pad, eos_token_id=tok.eos_token_id)
            return (out.shape[1] - enc["input_ids"].shape[1]) * B
    else:  # floor: the decode steps' matmuls and nothing else
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        xs = {m.in_features: torch.randn(B, m.in_features) for m in linears}

        def once(seed: int) -> int:
            with torch.no_grad():
                for _ in range(N):
                    for m in linears:
                        m(xs[m.in_features])
            return B * N

    t0 = time.perf_counter()
    for i in range(args.warmup):
        once(1000 + i)
    print(json.dumps({"warmup_s": time.perf_counter() - t0}), flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        tokens = once(int(line))
        dt = time.perf_counter() - t0
        print(json.dumps({"tokens": tokens, "tok_s": tokens / dt, "peak_rss_mb": peak_rss_mb()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="qwen3", choices=["qwen3", "llama"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2, help="untimed rollouts per side before timing")
    p.add_argument("--repeats", type=int, default=5, help="timed rollouts per side, alternating")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="also time keel with compile=True (compiling takes minutes)")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args)

    cmd = [sys.executable, __file__] + sys.argv[1:]
    sides = SIDES if args.compile else SIDES[:3]
    workers = {}
    for side in sides:  # started and warmed one at a time, so warm-ups do not compete
        print(f"starting and warming up the {side} worker", file=sys.stderr, flush=True)
        workers[side] = subprocess.Popen(cmd + ["--worker", side], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True)
        workers[side].warmup_s = json.loads(workers[side].stdout.readline())["warmup_s"]
    runs = {side: [] for side in sides}
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for side in sides:
            workers[side].stdin.write(f"{r}\n")
            workers[side].stdin.flush()
            runs[side].append(json.loads(workers[side].stdout.readline()))
    for w in workers.values():
        w.stdin.close()
        w.wait(60)

    expected = args.batch * args.new_tokens
    for side in set(sides) - {"floor"}:
        got = {run["tokens"] for run in runs[side]}
        assert got == {expected}, f"{side} generated {got} tokens per run, expected {expected}"
    res = {}
    for side in sides:
        tok_s = [run["tok_s"] for run in runs[side]]
        res[side] = {"tok_s": statistics.median(tok_s), "min": min(tok_s), "max": max(tok_s),
                     "peak_rss_mb": max(run["peak_rss_mb"] for run in runs[side]), "warmup_s": workers[side].warmup_s}
    ratio = res["keel"]["tok_s"] / res["hf"]["tok_s"]

    print(f"{args.arch} {args.layers}x{args.hidden}, batch {args.batch} x {args.new_tokens} new tokens, "
          f"median of {args.repeats} alternating runs")
    print(f"{'side':<24}{'tok/s':>9}{'min':>9}{'max':>9}{'ms/step':>9}{'warm-up s':>11}{'peak RSS MB':>13}")
    names = {"keel": "keel.engine.sampler.generate", "hf": "transformers generate()", "floor": "matmuls only (floor)",
             "keel_compiled": "keel, compile=True"}
    for side in sides:
        r = res[side]
        print(f"{names[side]:<24}{r['tok_s']:>9.0f}{r['min']:>9.0f}{r['max']:>9.0f}"
              f"{args.batch / r['tok_s'] * 1000:>9.1f}{r['warmup_s']:>11.1f}{r['peak_rss_mb']:>13.0f}")
    print(f"keel / transformers = {ratio:.2f}x  (goal 3x; the matmul floor allows at most "
          f"{res['floor']['tok_s'] / res['hf']['tok_s']:.2f}x)")
    extra = {}
    if args.compile:
        c = res["keel_compiled"]
        extra = {"keel_compiled_tok_s": round(c["tok_s"], 1),
                 "ratio_compiled": round(c["tok_s"] / res["hf"]["tok_s"], 3),
                 "keel_compiled_peak_rss_mb": round(c["peak_rss_mb"], 1),
                 "keel_compiled_warmup_s": round(c["warmup_s"], 2),
                 "keel_compiled_runs_tok_s": [round(r["tok_s"], 1) for r in runs["keel_compiled"]]}
        print(f"keel compile=True / transformers = {extra['ratio_compiled']:.2f}x "
              f"(compiling is in its {c['warmup_s']:.0f} s warm-up)")

    import torch

    print(json.dumps({
        "benchmark": "rollout_vs_hf", "arch": args.arch, "hidden": args.hidden, "layers": args.layers,
        "batch": args.batch, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "threads": args.threads or torch.get_num_threads(),
        "keel_tok_s": round(res["keel"]["tok_s"], 1), "hf_tok_s": round(res["hf"]["tok_s"], 1),
        "floor_tok_s": round(res["floor"]["tok_s"], 1), "ratio": round(ratio, 3),
        "max_ratio_at_floor": round(res["floor"]["tok_s"] / res["hf"]["tok_s"], 3),
        "keel_peak_rss_mb": round(res["keel"]["peak_rss_mb"], 1), "hf_peak_rss_mb": round(res["hf"]["peak_rss_mb"], 1),
        "keel_warmup_s": round(res["keel"]["warmup_s"], 2), "hf_warmup_s": round(res["hf"]["warmup_s"], 2),
        "keel_runs_tok_s": [round(r["tok_s"], 1) for r in runs["keel"]],
        "hf_runs_tok_s": [round(r["tok_s"], 1) for r in runs["hf"]],
        **extra, "goal_ratio": 3.0, "goal_met": ratio >= 3.0,
    }))


if __name__ == "__main__":
    main()
