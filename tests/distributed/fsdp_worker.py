"""Run by tests/distributed/test_distributed.py under `torchrun --nproc-per-node 2`: SFT steps with
`sync: fsdp` (FSDP2) on fixed micro-batched batches with binding gradient clipping (also with LoRA,
and with CPU offload), then through the training loop with checkpoints and a resume; RL updates
with a sharded KL reference, micro-batched, and with one rank holding no data; last, a whole RL
stage (rollouts on the plain copy, evaluation, OUT/model). Writes every rank's gathered full
weights into OUT."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import torch
import torch.distributed as dist

from keel.config import DistributedConfig, LoraSpec, ResilienceConfig, RLConfig, SFTConfig
from keel.distributed.sync import full_state
from keel.models import load_model, save_model, special_ids
from keel.rl.trainer import Batch, RLTrainer, rl
from keel.tasks import get_task
from keel.train import sft as sft_module
from keel.train.sft import SFTTrainer, encode_traces, pack
from keel.train.loop import train_loop
from keel.train.stage import plain_copy, train_stage
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


def trainer(distributed: DistributedConfig, **changes) -> SFTTrainer:
    m, tok = worker.model()
    return SFTTrainer(m, tok, SFTConfig(task="arithmetic", task_options={"digits": 2}, examples=64, lr=1e-3,
                                        warmup=0, grad_clip=CLIP, micro_batch_tokens=ROW, device="cpu",
                                        distributed=distributed, **changes))


LORA = LoraSpec(r=4)
RL_MICRO = 32  # padded tokens per RL micro-batch: 4 of them on rank 0, 5 on rank 1


def rl_trainer(distributed: DistributedConfig) -> RLTrainer:
    """GRPO with a KL term (the reference model runs), micro-batched, AdamW."""
    m, tok = worker.model()
    return RLTrainer(m, tok, RLConfig(task="arithmetic", task_options={"digits": 2}, group_size=4, prompts_per_step=4,
                                      lr=1e-3, grad_clip=worker.NO_CLIP, beta=0.1, micro_batch_tokens=RL_MICRO,
                                      device="cpu", distributed=distributed))


def no_data() -> Batch:
    """What dynamic sampling leaves a rank whose groups all lacked signal."""
    empty = torch.zeros(0)
    return Batch([], [], empty, empty, empty, empty.bool(), 8, [])


# A whole RL stage under fsdp: 2 steps, a KL term, an evaluation at the end.
RL_STAGE = RLConfig(task="arithmetic", task_options={"digits": 1}, steps=2, prompts_per_step=4, group_size=4,
                    max_new_tokens=8, beta=0.1, eval_every=2, eval_n=4, lr=1e-3, device="cpu", distributed=FSDP)


def full_weights(trainer) -> dict:
    """The whole model, gathered on this rank (collective)."""
    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone().contiguous() for k, v in full.items() if "lm_head" not in k}


def looped(out: Path, total: int, resume: bool = False, **changes):
    """A trainer taken to step `total` by the training loop, checkpointing every 2 steps into `out`."""
    t = trainer(FSDP, **changes)
    t.cfg = dataclasses.replace(t.cfg, steps=4)  # the lr schedule of a 4-step run
    train_loop(t, out, ResilienceConfig(checkpoint_every=2, resume=resume), total, "sft")
    return t


def main(out: Path) -> None:
    # Every batch over the logits budget: a plain model would run its LM head in chunks, apart from
    # its forward; a sharded one must not (FSDP gathers the head's weight in the forward only).
    sft_module.LOGITS_BUDGET = 1
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
    trained = full_state(whole.model, main_only=True)  # what train_stage gathers for OUT/model

    looped(out / "lora_cut", total=2, lora=LORA)  # LoRA: the checkpoints hold the adapters' shards
    resumed = looped(out / "lora_cut", total=4, resume=True, lora=LORA)
    save_file(full_weights(resumed), out / f"lora_resumed-rank{rank}.safetensors")
    whole = looped(out / "lora_whole", total=4, lora=LORA)
    save_file(full_weights(whole), out / f"lora_whole-rank{rank}.safetensors")

    t = trainer(FSDP, lora=LORA)
    for step in range(worker.STEPS):
        t.step_idx = step
        t.update(parts[rank])
        save_file(full_weights(t), out / f"lora_step{step + 1}-rank{rank}.safetensors")
    t = trainer(DistributedConfig(sync="fsdp", offload=True))
    t.update(parts[rank])
    save_file(full_weights(t), out / f"offload_step1-rank{rank}.safetensors")

    rl_parts = worker.rl_batches(tok, ranks)
    t = rl_trainer(FSDP)
    for step in range(worker.STEPS):
        t.step_idx = step
        t.update(rl_parts[rank])
        save_file(full_weights(t), out / f"rl_step{step + 1}-rank{rank}.safetensors")
    for name, distributed in (("rl_idle", FSDP), ("rl_idle_ddp", DistributedConfig(sync="ddp"))):
        t = rl_trainer(distributed)
        t.update(rl_parts[0] if rank == 0 else no_data())
        save_file(full_weights(t), out / f"{name}-rank{rank}.safetensors")

    if rank == 0:
        save_model(*worker.model(), out / "tiny")
    dist.barrier()
    model, _ = load_model(out / "tiny")
    rl(model, tok, RL_STAGE, out / "rl")  # what train_stage runs, without its ending the process group
    rl_trained = full_state(model, main_only=True)
    # With LoRA, as `keel rl --sync fsdp` runs it: OUT/adapter and the merged OUT/model. Last:
    # train_stage ends the process group.
    train_stage(rl, dataclasses.replace(RL_STAGE, lora=LORA), out / "tiny", out / "rl_lora")
    if rank == 0:
        save_model(plain_copy(out / "tiny", RL_STAGE, rl_trained), tok, out / "rl" / "model")
        plain, _ = worker.model()
        plain.load_state_dict(trained)
        save_model(plain, tok, out / "whole" / "model")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
