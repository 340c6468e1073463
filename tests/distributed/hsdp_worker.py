"""Run by tests/distributed/test_distributed.py under `torchrun --nproc-per-node 4`: DiLoCo over
FSDP2 (`shard_group: 2`, two groups of two ranks) on fixed SFT batches, then one group of all four
ranks (`shard_group: 4`). Writes every rank's gathered full weights after each step, its own
shard sizes and its byte counters into OUT, for the test to compare with two single-process
DiLoCo workers. Then the same two groups through the training loop with checkpoints (DCP): the
whole run, and a run resumed from its step-3 checkpoint (between syncs)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from keel.config import DistributedConfig, ResilienceConfig, SFTConfig
from keel.distributed import shutdown
from keel.distributed.sync import full_state, local
from keel.models import special_ids
from keel.resilience.faults import NO_FAULTS
from keel.tasks import get_task
from keel.train.loop import train_loop
from keel.train.sft import SFTTrainer, encode_traces, pack
from tests.distributed import worker

STEPS, INNER = 4, 2  # two outer syncs
ROW = 64  # tokens per packed row, and per micro-batch: one backward pass per row
CLIP = 1.0
GROUP_ROWS = ((0, 2), (2, 3)), ((0, 1), (1, 2))  # group -> its two ranks' rows of the group's batch


def group_batches(tokenizer):
    """One packed batch per group (3 rows, then 2 rows): each is what one DiLoCo worker trains on."""
    pairs = encode_traces(tokenizer, get_task("arithmetic", digits=2).examples("train", 12, seed=0))
    _, pad_id = special_ids(tokenizer)
    return [pack(pairs[g * 6:g * 6 + 6 - 2 * g], ROW, pad_id) for g in range(2)]


class FixedBatch(SFTTrainer):
    """Each step on the same batch (`fixed`, this rank's rows), at the constant learning rate."""
    fixed = None

    def step(self, injector=NO_FAULTS, apply: bool = True) -> dict:
        row = self.update(self.fixed, injector)
        self.step_idx += 1
        return {"stage": "sft", "step": self.step_idx, **row}


def trainer(distributed: DistributedConfig, cls=SFTTrainer) -> SFTTrainer:
    m, tok = worker.model()
    return cls(m, tok, SFTConfig(task="arithmetic", task_options={"digits": 2}, examples=64, lr=1e-3,
                                 warmup=0, grad_clip=CLIP, micro_batch_tokens=ROW, device="cpu",
                                 distributed=distributed))


def full_weights(t: SFTTrainer) -> dict:
    """The group's whole model, gathered on this rank (collective within the group)."""
    return {k: v.detach().clone().contiguous() for k, v in full_state(t.model).items() if "lm_head" not in k}


def main(out: Path) -> None:
    figures = {}
    t = trainer(DistributedConfig(sync="diloco", inner_steps=INNER, shard_group=2))
    rank = t.sync.world.rank
    group, member = divmod(rank, 2)
    start, stop = GROUP_ROWS[group][member]
    mine = group_batches(worker.model()[1])[group].rows(start, stop, "cpu")
    before = dict(t.sync.comm.bytes)
    for step in range(STEPS):
        t.step_idx = step
        t.update(mine)
        t.sync.after_step(step + 1, final=False)
        save_file(full_weights(t), out / f"hsdp_step{step + 1}-rank{rank}.safetensors")
    figures["hsdp"] = {"before": before, "total": dict(t.sync.comm.bytes),
                       "shard_numel": sum(local(p).numel() for p in t.sync.params)}

    # The same through the training loop, a checkpoint every 3 steps (step 3: between syncs, the
    # groups' weights and AdamW moments differ), then resumed from step 3 in another folder.
    for run, res in (("whole", ResilienceConfig(checkpoint_every=3)),
                     ("resumed", ResilienceConfig(checkpoint_every=3, resume=True))):
        if run == "resumed" and rank == 0:
            shutil.copytree(out / "whole/checkpoints/00000003", out / "resumed/checkpoints/00000003")
        t.sync.comm.barrier()
        t = trainer(DistributedConfig(sync="diloco", inner_steps=INNER, shard_group=2), FixedBatch)
        t.fixed = mine
        before = dict(t.sync.comm.bytes)
        train_loop(t, out / run, res, STEPS, "sft")
        save_file(full_weights(t), out / f"{run}-rank{rank}.safetensors")
        figures[run] = {"before": before, "total": dict(t.sync.comm.bytes)}

    # One group of every rank: plain FSDP, and an outer step that sends nothing.
    t = trainer(DistributedConfig(sync="diloco", inner_steps=1, shard_group=4))
    batch = group_batches(worker.model()[1])[0].rows(rank % 3, rank % 3 + 1, "cpu")
    for step in range(2):
        t.step_idx = step
        t.update(batch)
        t.sync.after_step(step + 1, final=False)
    save_file(full_weights(t), out / f"one_group-rank{rank}.safetensors")
    figures["one_group"] = dict(t.sync.comm.bytes)
    main = full_state(t.model, main_only=True)  # what OUT/model is written from (train/stage.py)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in main.items() if "lm_head" not in k}, out / "one_group_main.safetensors")

    (out / f"hsdp_figures-rank{rank}.json").write_text(json.dumps(figures))
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
