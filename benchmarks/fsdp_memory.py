"""Memory per rank, DDP against FSDP2: the same AdamW steps on 2 gloo ranks of this CPU.

The model has Qwen3-0.6B's shape (hidden 1024, 16 heads, 8 KV heads of 128 dims, MLP 3072,
151,936-token vocabulary, tied embeddings; random init, fp32) but `--layers` decoder layers
instead of 28: the full 0.6B model takes 16 bytes per parameter under DDP (weights, gradients,
AdamW's two moments), 9.5 GB per rank, 19 GB for two ranks before activations, more than this
shared 24 GB machine can give. Each mode is its own `torchrun --nproc-per-node 2` launch
through keel's synchronisers (`make_sync`: keel's DDP, or FSDP2 `fully_shard` per decoder layer
then the root) and keel's AdamW; each rank trains on its own random batch for `--steps` steps.

Per rank: peak RSS over the training steps (VmHWM, reset after the set-up, whose own peak, the
full model built on every rank and flattened for rank 0's broadcast before sharding, is listed
apart), the bytes of parameters + AdamW state this rank holds
(counted from the tensors: its FSDP shards, or the whole model under DDP), the median step time
after the first step, and the bytes it hands to collectives per step, as keel's counters took
them during the run (`comm_bytes`, what a training run logs per step): DDP's gradient buckets,
FSDP2's all-gathers and reduce-scatters ("fsdp", `keel.distributed.comm.count_fsdp`: every layer's
shard gathered in the forward and again in the backward, the root's once, the full gradient
reduce-scattered; `comm.fsdp_pass_bytes` says the same from the shapes), and the control scalars.

    .venv/bin/python benchmarks/fsdp_memory.py                 # 4 layers, 3 steps (~3 min)
    .venv/bin/python benchmarks/fsdp_memory.py --layers 8 --steps 4

Prints a table and, last, one JSON line with rss_ddp_mb, rss_fsdp_mb and memory_ratio (fsdp /
ddp parameter + optimizer bytes per rank; rss_ratio: the same for peak RSS).
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
from pathlib import Path

from common import peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 1024, 16, 8, 128, 3072, 151_936


def child(mode: str, layers: int, steps: int, tokens: int, out: Path) -> None:
    """One rank of one mode (under torchrun): train, then write this rank's figures to `out`."""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, str(ROOT))
    from keel.config import DistributedConfig
    from keel.distributed import make_sync, shutdown
    from keel.distributed.sync import local
    from keel.optim import make_optimizer

    torch.set_num_threads(1)  # two ranks on two cores
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      tie_word_embeddings=True, max_position_embeddings=4096)
    model = Qwen3ForCausalLM(cfg)
    device = torch.device("cpu")
    sync = make_sync(DistributedConfig(sync=mode), model, device)
    optimizer = make_optimizer(model, 1e-4)
    rank = sync.world.rank
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(rank))
    sync.comm.take_step()  # the start-up weight broadcast is no step's
    # Every rank builds the full model and flattens it for rank 0's broadcast before FSDP shards
    # it: that start-up peak is the same for both modes and says nothing about training.
    setup_peak = peak_rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    times, sent = [], []
    for _ in range(steps):
        start = time.perf_counter()
        # Through the synchroniser, as the trainers run it: DDP's gradient all-reduce is hooked to this forward.
        logits = sync.run(lambda m: m(input_ids=ids[:, :-1]).logits)
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        sync.grads()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync.comm.scalar(1.0, "control")  # what a training step's metrics reduction costs, as in keel's loop
        times.append(time.perf_counter() - start)
        sent.append(sync.comm.take_step())
    held = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    held += sum(local(t).numel() * local(t).element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.numel() > 1)  # the moments, not the step counters
    figures = {"peak_rss_mb": peak_rss_mb(), "setup_peak_rss_mb": setup_peak, "param_optimizer_mb": held / 2 ** 20,
               "step_s": statistics.median(times[1:] or times),
               "comm_bytes": statistics.median(s["comm_bytes"] for s in sent),
               "fsdp_bytes": statistics.median(s.get("comm_bytes_fsdp", 0) for s in sent),
               "params": sum(p.numel() for p in model.parameters())}
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps(figures))
    shutdown()


def launch(mode: str, args, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__, "--child", mode,
           "--layers", str(args.layers), "--steps", str(args.steps), "--tokens", str(args.tokens), "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (Qwen3-0.6B has 28)")
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps per mode (the first is a warm-up)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per rank per step")
    parser.add_argument("--child", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.layers, args.steps, args.tokens, args.out)
        return
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ranks = {mode: launch(mode, args, Path(tmp)) for mode in ("ddp", "fsdp")}
    worst = {mode: {k: max(r[k] for r in rs) for k in rs[0]} for mode, rs in ranks.items()}  # the busier rank
    ddp, fsdp = worst["ddp"], worst["fsdp"]
    sent = {"ddp": ddp["comm_bytes"], "fsdp": fsdp["comm_bytes"]}
    params = ddp["params"]
    print(f"\nQwen3-0.6B shape with {args.layers} of its 28 layers ({params / 1e6:.0f}M parameters; the full model "
          "needs 19 GB for two DDP ranks' weights, gradients and AdamW state alone, on a shared 24 GB machine); "
          f"2 gloo ranks, 1 thread each, {args.tokens} tokens per rank per step, fp32; per rank, the larger of "
          "the two ranks'")
    print(f"{'':6}{'peak RSS MB':>12}{'set-up peak MB':>16}{'params+AdamW MB':>17}{'step s':>9}{'MB sent/step':>14}")
    for mode in ("ddp", "fsdp"):
        w = worst[mode]
        print(f"{mode:6}{w['peak_rss_mb']:>12.0f}{w['setup_peak_rss_mb']:>16.0f}{w['param_optimizer_mb']:>17.0f}"
              f"{w['step_s']:>9.2f}{sent[mode] / 2 ** 20:>14.1f}")
    print(f"MB sent: keel's counters during the run; fsdp's own all-gathers and reduce-scatters "
          f"{fsdp['fsdp_bytes'] / 2 ** 20:.1f} of its {sent['fsdp'] / 2 ** 20:.1f}, the rest control scalars")
    print(json.dumps({
        "layers": args.layers, "params": params, "tokens": args.tokens, "steps": args.steps,
        "rss_ddp_mb": round(ddp["peak_rss_mb"], 1), "rss_fsdp_mb": round(fsdp["peak_rss_mb"], 1),
        "rss_ratio": round(fsdp["peak_rss_mb"] / ddp["peak_rss_mb"], 3),
        "param_optimizer_ddp_mb": round(ddp["param_optimizer_mb"], 1),
        "param_optimizer_fsdp_mb": round(fsdp["param_optimizer_mb"], 1),
        "memory_ratio": round(fsdp["param_optimizer_mb"] / ddp["param_optimizer_mb"], 3),
        "step_s_ddp": round(ddp["step_s"], 3), "step_s_fsdp": round(fsdp["step_s"], 3),
        "bytes_per_step_ddp": sent["ddp"], "bytes_per_step_fsdp": sent["fsdp"],
        "fsdp_collective_bytes_per_step": fsdp["fsdp_bytes"],
        "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
