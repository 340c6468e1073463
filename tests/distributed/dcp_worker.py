"""Run by tests/distributed/test_sharded_checkpoints.py under `torchrun --nproc-per-node 2`: SFT
under `sync: fsdp` through the training loop with sharded (DCP) checkpoints, in one launch:

  whole    4 steps, a checkpoint every 2
  cut      stopped after its step-2 checkpoint, then resumed to step 4 (background writes)
  corrupt  a copy of `whole` with a byte of rank 1's step-4 shard flipped and a temporary folder
           left by a crash, resumed: it must fall back to step 2 and end where `whole` did
  grown    a one-process checkpoint (written by the test before this launch) resumed on 2 ranks

and writes what each rank gathered (full weights, and the full optimizer state where a resume
loaded it) into OUT."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from keel.config import DistributedConfig, ResilienceConfig
from keel.distributed import shutdown
from keel.train.loop import train_loop
from tests.distributed import fsdp_worker

FSDP = DistributedConfig(sync="fsdp")
STEPS = 4
EVERY = 2


def looped(out: Path, total: int, resume: bool = False, background: bool = False, trainer=None):
    """A trainer taken to step `total` by the training loop (the lr schedule of a 4-step run),
    checkpointing every 2 steps into `out`."""
    t = trainer or fsdp_worker.trainer(FSDP)
    t.cfg = dataclasses.replace(t.cfg, steps=STEPS)
    res = ResilienceConfig(checkpoint_every=EVERY, resume=resume, async_checkpoint=background)
    train_loop(t, out, res, total, "sft")
    return t


def full_state(trainer) -> dict:
    """Model and optimizer state gathered in full on this rank (collective), flat keys
    `model/<name>` and `optimizer/<name>/<slot>`."""
    model, optim = get_state_dict(trainer.model, trainer.optimizer, options=StateDictOptions(full_state_dict=True))
    flat = {f"model/{k}": v for k, v in model.items() if "lm_head" not in k}
    flat |= {f"optimizer/{name}/{slot}": v for name, slots in optim["state"].items() for slot, v in slots.items()}
    return {k: v.detach().clone().contiguous() for k, v in flat.items()}


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    cut = looped(out / "cut", total=2, background=True)
    save_file(full_state(cut), out / f"cut_step2-rank{rank}.safetensors")
    resumed = looped(out / "cut", total=4, resume=True, background=True)
    save_file(full_state(resumed), out / f"resumed-rank{rank}.safetensors")
    whole = looped(out / "whole", total=4)
    save_file(full_state(whole), out / f"whole-rank{rank}.safetensors")

    if rank == 0:
        shutil.copytree(out / "whole", out / "corrupt")
        flip_a_byte(out / "corrupt/checkpoints/00000004/dcp/__1_0.distcp")
        left = out / "corrupt/checkpoints/.tmp-00000006"  # a crash while step 6 was written
        shutil.copytree(out / "whole/checkpoints/00000004", left)
    dist.barrier()
    corrupt = looped(out / "corrupt", total=4, resume=True)
    save_file(full_state(corrupt), out / f"corrupt-rank{rank}.safetensors")

    grown = looped(out / "grown", total=2, resume=True)  # loads the one-process step-2 checkpoint, takes no step
    save_file(full_state(grown), out / f"grown_loaded-rank{rank}.safetensors")
    train_loop(grown, out / "grown2", ResilienceConfig(), STEPS, "sft")  # and trains on
    save_file(full_state(grown), out / f"grown-rank{rank}.safetensors")
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
