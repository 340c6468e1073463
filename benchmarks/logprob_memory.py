"""Peak memory of token log-probs + backward: the [B, T, V] logits vs hidden_logprobs's chunks.

A 2-layer Qwen3-shaped model (Qwen's 151,936-token vocabulary, hidden 256, tied embeddings,
random init, fp32 on the CPU) scores 8 completions x 256 tokens and back-propagates
-mean(logp) (with `--entropy`, also -0.01 * mean(entropy), with its gradient):

  plain        model(ids).logits -> keel.logprobs.token_logprobs (entropy_BT) -> backward
  hidden@C     model.model(ids) hidden states -> keel.logprobs.hidden_logprobs through
               model.lm_head.weight, C positions at a time -> backward

Each side runs in its own subprocess (its peak RSS is its own), sides alternate over
`--repeats` runs, the table and the JSON report medians. A side builds the model, allocates
its gradients, runs one warm-up step, then resets its peak RSS to the current RSS (writing 5 to
/proc/self/clear_refs) and measures one step: "peak above model" = VmHWM after the step minus
the RSS before it (weights, gradients, the allocator's warm state). Every side's loss must
agree with the plain one, or the script fails: the memory is saved on the same numbers.

    .venv/bin/python benchmarks/logprob_memory.py                     # plain vs chunks of 1024 and 256
    .venv/bin/python benchmarks/logprob_memory.py --entropy --chunks 512

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS = 151_936, 256, 2, 4, 2  # heads of 64 dims, Qwen3's vocabulary
BATCH, TOKENS, SEED = 8, 256, 0


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(side: str, chunk: int, entropy: bool, temperature: float, threads: int) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, str(ROOT))
    from keel.logprobs import entropy_BT, hidden_logprobs, token_logprobs

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=3 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
        tie_word_embeddings=True, max_position_embeddings=TOKENS + 1,
    )
    model = Qwen3ForCausalLM(cfg).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ids_BT = torch.randint(VOCAB, (BATCH, TOKENS + 1), generator=torch.Generator().manual_seed(SEED))
    inputs_BT, targets_BT = ids_BT[:, :-1], ids_BT[:, 1:]

    def step() -> float:
        if side == "plain":
            logits_BTV = model(input_ids=inputs_BT, use_cache=False).logits
            logp = token_logprobs(logits_BTV, targets_BT, temperature)
            ent = entropy_BT(logits_BTV.float() / temperature) if entropy else None
        else:
            hidden_BTH = model.model(input_ids=inputs_BT, use_cache=False).last_hidden_state
            logp, ent = hidden_logprobs(
                hidden_BTH.reshape(-1, HIDDEN), model.lm_head.weight, targets_BT.reshape(-1),
                temperature=temperature, chunk=chunk, with_entropy=entropy,
            )
        loss = -logp.mean() - (0.01 * ent.mean() if entropy else 0.0)
        loss.backward()
        return loss.item()

    step()  # warm-up: gradients, the allocator, lazy inits
    model.zero_grad(set_to_none=False)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = rss_mb()
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
    return {"model_mb": before, "peak_above_mb": peak_rss_mb() - before, "step_s": seconds, "loss": loss, "grad_norm": grad_norm}


def spawn(side: str, chunk: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--chunk", str(chunk), "--temperature", str(args.temperature),
           "--threads", str(args.threads)] + (["--entropy"] if args.entropy else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} (chunk {chunk}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", default="1024,256", help="hidden_logprobs chunk sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--entropy", action="store_true", help="also back-propagate through the entropy")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per side (1 on a shared machine)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.chunk, args.entropy, args.temperature, args.threads)))
        return

    sides = [("plain", 0)] + [("hidden", int(c)) for c in args.chunks.split(",")]
    runs: dict[tuple, list[dict]] = {s: [] for s in sides}
    for r in range(args.repeats):
        order = sides[r % len(sides):] + sides[: r % len(sides)]  # rotate who goes first
        for side in order:
            runs[side].append(spawn(*side, args))
            print(f"repeat {r + 1}: {side[0]}{'@' + str(side[1]) if side[1] else ''} "
                  f"{runs[side][-1]['peak_above_mb']:.0f} MB", file=sys.stderr)

    med = {s: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for s, rs in runs.items()}
    ref = med[("plain", 0)]
    for s, m in med.items():  # the same numbers, or the comparison means nothing
        if abs(m["loss"] - ref["loss"]) > 1e-4 * max(1.0, abs(ref["loss"])) or abs(m["grad_norm"] - ref["grad_norm"]) > 1e-3 * ref["grad_norm"]:
            raise SystemExit(f"{s} disagrees with plain: loss {m['loss']} vs {ref['loss']}, grad norm {m['grad_norm']} vs {ref['grad_norm']}")

    N = BATCH * TOKENS
    print(f"Qwen3-shaped, {LAYERS} layers, hidden {HIDDEN}, vocab {VOCAB:,}; {BATCH} x {TOKENS} tokens "
          f"(fp32 [N, V] logits = {N * VOCAB * 4 / 2**20:,.0f} MB); entropy grad: {args.entropy}; "
          f"{args.threads} thread(s); medians of {args.repeats}")
    print(f"{'side':<14}{'model MB':>10}{'peak above model MB':>22}{'step s':>9}{'loss':>12}")
    for (side, chunk), m in med.items():
        name = side if side == "plain" else f"hidden@{chunk}"
        print(f"{name:<14}{m['model_mb']:>10.0f}{m['peak_above_mb']:>22.0f}{m['step_s']:>9.2f}{m['loss']:>12.6f}")
    out = {"vocab": VOCAB, "positions": N, "entropy": args.entropy, "repeats": args.repeats,
           "plain_peak_above_mb": round(ref["peak_above_mb"], 1), "plain_step_s": round(ref["step_s"], 3)}
    for (side, chunk), m in med.items():
        if side == "hidden":
            out[f"hidden{chunk}_peak_above_mb"] = round(m["peak_above_mb"], 1)
            out[f"hidden{chunk}_step_s"] = round(m["step_s"], 3)
            out[f"hidden{chunk}_memory_ratio"] = round(ref["peak_above_mb"] / m["peak_above_mb"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
