"""Run by tests/distributed/test_distributed.py under `torchrun --nproc-per-node 2`: SFT steps with
`sync: fsdp` (FSDP2) on fixed micro-batched batches with binding gradient clipping, then through the
training loop with checkpoints and a resume; writes every rank's gathered full weights into OUT."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from keel.config import DistributedConfig, ResilienceConfig, SFTConfig
from keel.distributed import shutdown
from keel.models import save_model, special_ids
from keel.tasks import get_task
from keel.train.sft import SFTTrainer, encode_traces, pack
from keel.train.loop import train_loop
from tests.distributed import worker

FSDP = DistributedConfig(sync="fsdp")
ROW = 64   # tokens per packed row, and per micro-batch: one backward pass per row
CLIP = 1.0  # below every step's gradient norm: clipping takes part


def batches(tokenizer, ranks: int):
    """One packed batch per rank: 3 rows (106 tokens) on rank 0, 2 rows (74 tokens) on rank 1, so
    the ranks weigh differently and rank 1 has a micro-batch fewer."""
    pairs = encode_traces(tokenizer, get_task("arithmetic", digits=2).examples("train", 12, seed=0))
    _, pad_id = special_ids(tokenizer)
    return [pack(pairs[r * 6:r * 6 + 6 - 2 * r], ROW, pad_id) for r in range(ranks)]


def trainer(distributed: DistributedConfig) -> SFTTrainer:
    m, tok = worker.model()
    return SFTTrainer(m, tok, SFTConfig(task="arithmetic", task_options={"digits": 2}, examples=64, lr=1e-3,
                                        warmup=0, grad_clip=CLIP, micro_batch_tokens=ROW, device="cpu",
                                        distributed=distributed))


def full_weights(trainer) -> dict:
    """The whole model, gathered on this rank (collective)."""
    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone().contiguous() for k, v in full.items() if "lm_head" not in k}


def looped(out: Path, total: int, resume: bool = False):
    """A trainer taken to step `total` by the training loop, checkpointing every 2 steps into `out`."""
    t = trainer(FSDP)
    t.cfg = dataclasses.replace(t.cfg, steps=4)  # the lr schedule of a 4-step run
    train_loop(t, out, ResilienceConfig(checkpoint_every=2, resume=resume), total, "sft")
    return t


def main(out: Path) -> None:
    t = trainer(FSDP)
    rank, ranks = t.sync.world.rank, t.sync.world.size
    _, tok = worker.model()
    parts = batches(tok, ranks)
    norms = []
    for step in range(worker.STEPS):
        t.step_idx = step
        norms.append(t.update(parts[rank])["grad_norm"])
        save_file(full_weights(t), out / f"fsdp_step{step + 1}-rank{rank}.safetensors")
    (out / f"fsdp_grad_norms-rank{rank}.json").write_text(json.dumps(norms))

    looped(out / "cut", total=2)  # a run stopped after its step-2 checkpoint ...
    resumed = looped(out / "cut", total=4, resume=True)  # ... and continued from it
    save_file(full_weights(resumed), out / f"fsdp_resumed-rank{rank}.safetensors")
    whole = looped(out / "whole", total=4)
    save_file(full_weights(whole), out / f"fsdp_whole-rank{rank}.safetensors")
    whole.sync.unshard_model()  # what sft() does before train_stage writes OUT/model
    shutdown()
    if rank == 0:
        save_model(whole.model, tok, out / "whole" / "model")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
