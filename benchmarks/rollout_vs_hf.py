"""Rollout decode throughput: keel's sampling engine vs transformers' `model.generate()`.

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
this machine goes under, so `floor_tok_s / hf_tok_s` is about the largest ratio any fp32 engine
could show. A fourth, `hf_bf16`, is transformers' generate() on the model cast to bf16: the peer
of keel's torch:cpu:bf16 sampler (on CPUs with AVX512_BF16 or AMX, bf16 matmuls beat the fp32
floor), so the table also gives the fastest keel sampler against it.
keel's side is what RL rollouts, `keel eval` and `keel label` run: `keel.completions.generate`,
the one engine (keel.engine.batching) over the model itself, every row sampling from one generator.
`--compile` adds a worker, keel with `compile=True`; its compile time is in its warm-up
column, not in its tok/s.

`--backends` adds one worker per keel backend spec (default: onnxruntime:cpu:fp32, :int8 and
:int4): the sampler keel's RL trainer builds for `rollout:` that spec (RLConfig's rollout section,
keel.engine.backends.rollout_section; for ONNX Runtime the model exported once with its weights
fed as graph inputs, quantized where the spec says), driven as RL rollouts drive it (the batching
engine, one generator for all rows). Building it (export, quantization) is in its warm-up
column. A spec this keel cannot build is reported as not available, with the reason. ONNX Runtime
picks its own thread count (the trainer's rollout config has no threads knob), so compare those
rows at `--threads 0`. The JSON's `best` names the fastest keel worker and `best_ratio` its ratio.

    .venv/bin/python benchmarks/rollout_vs_hf.py
    .venv/bin/python benchmarks/rollout_vs_hf.py --compile
    .venv/bin/python benchmarks/rollout_vs_hf.py --hidden 256 --layers 4 --repeats 9
    .venv/bin/python benchmarks/rollout_vs_hf.py --backends onnxruntime:cpu:int8,torch:cpu:bf16
    .venv-vllm/bin/python benchmarks/rollout_vs_hf.py --backends vllm:cpu,torch:cpu:bf16   # with vLLM
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from common import peak_rss_mb

SIDES = ("keel", "hf", "floor", "hf_bf16", "keel_compiled")
DEFAULT_BACKENDS = "onnxruntime:cpu:fp32,onnxruntime:cpu:int8,onnxruntime:cpu:int4"


def rollout_sampler(model, tokenizer, spec: str):
    """The sampler keel's RL trainer builds for `rollout:` backend `spec`, holding `model`'s
    weights (a KeelError where this keel cannot sample on it)."""
    from keel.config import RLConfig, RolloutConfig, from_dict
    from keel.engine.backends import rollout_section
    from keel.rl.trainer import RLTrainer

    cfg = RLConfig(device="cpu", dtype="fp32", correction="tis",
                   rollout=from_dict(RolloutConfig, rollout_section(spec), "rollout"))
    return RLTrainer(model, tokenizer, cfg).sampler


def worker(side: str, args) -> None:
    """Build the model and prompts, warm up, then time one rollout per 'run' line on stdin.
    A backend `side` that cannot be built says why on its first line and stops."""
    import torch

    from keel.errors import KeelError

    from keel.completions import generate
    from keel.models import init_model, render_prompt
    from keel.engine.sampler import SamplingParams
    from keel.tasks import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = init_model(args.arch, layers=args.layers, hidden=args.hidden, seed=0)
    model.eval()
    questions = [ex.question for ex in get_task("arithmetic").examples("test", args.batch, seed=0)]
    prompts = [render_prompt(tok, q) for q in questions]
    B, N, pad = len(prompts), args.new_tokens, tok.pad_token_id
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=N)
    t0 = time.perf_counter()

    if side not in SIDES:  # a backend spec
        try:
            backend = rollout_sampler(model, tok, side)
        except (KeelError, ImportError) as e:
            print(json.dumps({"error": str(e).splitlines()[0]}), flush=True)
            return

        def once(seed: int) -> int:  # as RL rollouts sample it (keel.completions.complete)
            g = torch.Generator(device=backend.device).manual_seed(seed)
            out = generate(backend, prompts, params, eos_id=-1, generator=g)
            return sum(len(t) for t in out.tokens)
    elif side in ("keel", "keel_compiled"):
        def once(seed: int) -> int:
            g = torch.Generator().manual_seed(seed)
            out = generate(model, prompts, params, eos_id=-1, generator=g, compile=side == "keel_compiled")
            return sum(len(t) for t in out.tokens)
    elif side in ("hf", "hf_bf16"):
        if side == "hf_bf16":
            model.to(torch.bfloat16)
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

    for i in range(args.warmup):
        once(1000 + i)
    print(json.dumps({"warmup_s": time.perf_counter() - t0}), flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        tokens = once(int(line))
        dt = time.perf_counter() - t0
        print(json.dumps({"tokens": tokens, "tok_s": tokens / dt, "peak_rss_mb": peak_rss_mb()}), flush=True)


def read_json(worker) -> dict | None:
    """The worker's next JSON line (None at its end); other lines (a library's log on stdout, as
    vLLM writes it) are passed on to stderr."""
    for line in worker.stdout:
        if line.startswith("{"):
            return json.loads(line)
        sys.stderr.write(line)
    return None


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
    p.add_argument("--backends", default=DEFAULT_BACKENDS,
                   help="comma-separated keel backend specs to time as RL rollout samplers ('' for none)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a side in SIDES or a backend spec
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args)

    cmd = [sys.executable, __file__] + sys.argv[1:]
    specs = [b for b in args.backends.split(",") if b]
    sides = [*(SIDES if args.compile else SIDES[:4]), *specs]
    workers, unavailable = {}, {}
    for side in sides:  # started and warmed one at a time, so warm-ups do not compete
        print(f"starting and warming up the {side} worker", file=sys.stderr, flush=True)
        w = subprocess.Popen(cmd + ["--worker", side], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first = read_json(w) or {"error": "the worker died (its error is above)"}
        if "error" in first:
            unavailable[side] = first["error"]
            w.stdin.close()
            w.wait(60)
            print(f"  {side}: not available: {first['error']}", file=sys.stderr, flush=True)
            continue
        workers[side], w.warmup_s = w, first["warmup_s"]
    sides = list(workers)
    runs = {side: [] for side in sides}
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for side in sides:
            workers[side].stdin.write(f"{r}\n")
            workers[side].stdin.flush()
            runs[side].append(read_json(workers[side]))
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
    keel_sides = [s for s in sides if s not in ("hf", "floor", "hf_bf16")]
    best = max(keel_sides, key=lambda s: res[s]["tok_s"])
    best_ratio = res[best]["tok_s"] / res["hf"]["tok_s"]

    print(f"{args.arch} {args.layers}x{args.hidden}, batch {args.batch} x {args.new_tokens} new tokens, "
          f"median of {args.repeats} alternating runs")
    print(f"{'side':<32}{'tok/s':>9}{'min':>9}{'max':>9}{'ms/step':>9}{'vs HF':>7}{'warm-up s':>11}{'peak RSS MB':>13}")
    names = {"keel": "keel.completions.generate", "hf": "transformers generate()", "floor": "matmuls only (floor)",
             "hf_bf16": "transformers generate(), bf16",
             "keel_compiled": "keel, compile=True"}
    for side in sides:
        r = res[side]
        print(f"{names.get(side, 'keel, ' + side):<32}{r['tok_s']:>9.0f}{r['min']:>9.0f}{r['max']:>9.0f}"
              f"{args.batch / r['tok_s'] * 1000:>9.1f}{r['tok_s'] / res['hf']['tok_s']:>7.2f}{r['warmup_s']:>11.1f}"
              f"{r['peak_rss_mb']:>13.0f}")
    for side, why in unavailable.items():
        print(f"{'keel, ' + side:<32}  not available: {why}")
    print(f"keel / transformers = {ratio:.2f}x; fastest keel ({best}) {best_ratio:.2f}x  (goal 3x; the fp32 matmul "
          f"floor allows at most {res['floor']['tok_s'] / res['hf']['tok_s']:.2f}x at fp32); against transformers "
          f"in bf16 {res[best]['tok_s'] / res['hf_bf16']['tok_s']:.2f}x")
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
        "hf_bf16_tok_s": round(res["hf_bf16"]["tok_s"], 1), "hf_bf16_peak_rss_mb": round(res["hf_bf16"]["peak_rss_mb"], 1),
        "best_ratio_vs_hf_bf16": round(res[best]["tok_s"] / res["hf_bf16"]["tok_s"], 3),
        "max_ratio_at_floor": round(res["floor"]["tok_s"] / res["hf"]["tok_s"], 3),
        "keel_peak_rss_mb": round(res["keel"]["peak_rss_mb"], 1), "hf_peak_rss_mb": round(res["hf"]["peak_rss_mb"], 1),
        "keel_warmup_s": round(res["keel"]["warmup_s"], 2), "hf_warmup_s": round(res["hf"]["warmup_s"], 2),
        "keel_runs_tok_s": [round(r["tok_s"], 1) for r in runs["keel"]],
        "hf_runs_tok_s": [round(r["tok_s"], 1) for r in runs["hf"]],
        **extra,
        "backends": {s: {"tok_s": round(res[s]["tok_s"], 1), "ratio": round(res[s]["tok_s"] / res["hf"]["tok_s"], 3),
                         "peak_rss_mb": round(res[s]["peak_rss_mb"], 1), "warmup_s": round(res[s]["warmup_s"], 2),
                         "runs_tok_s": [round(r["tok_s"], 1) for r in runs[s]]} for s in specs if s in res},
        "not_available": unavailable,
        "best": best, "best_ratio": round(best_ratio, 3), "goal_ratio": 3.0, "goal_met": best_ratio >= 3.0,
    }))


if __name__ == "__main__":
    main()
