"""Run by tests/distributed/test_distributed.py under `torchrun --nproc-per-node 2`: SFT steps with
`sync: fsdp` (FSDP2) on fixed micro-batched batches with binding gradient clipping (also with LoRA,
with an untied LM head, and with CPU offload), then through the training loop with checkpoints and
a resume; RL updates with a sharded KL reference, micro-batched, and with one rank holding no data;
last, a whole RL stage (rollouts on the plain copy, evaluation, OUT/model). Every batch is over the
logits budget, so the sharded LM head runs in chunks (engine/head). Writes every rank's gathered
full weights into OUT, and per phase whether the head ran chunked and how often it ran whole."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM

import torch
import torch.distributed as dist

from keel.config import DistributedConfig, LoraSpec, ResilienceConfig, RLConfig, SFTConfig
from keel.distributed.sync import full_state
from keel.engine import head
from keel.models import load_model, save_model, special_ids
from keel.rl.trainer import Batch, RLTrainer, rl
from keel.tasks import get_task
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


def untied():
    """The worker's model with an LM head of its own (Qwen3-0.6B ties it to the embeddings,
    Qwen3-8B does not), initialised from the same seed."""
    m, tok = worker.model()
    config = copy.deepcopy(m.config)
    config.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32), tok


def trainer(distributed: DistributedConfig, model=None, **changes) -> SFTTrainer:
    m, tok = model or worker.model()
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
# An untrained model rarely answers: seed 3's rollouts score in both steps (seeds 0-2 score nothing
# with this engine's random stream, and a stage with no reward would not move the weights it tests).
RL_STAGE = RLConfig(task="arithmetic", task_options={"digits": 1}, steps=2, prompts_per_step=4, group_size=4,
                    max_new_tokens=8, beta=0.1, eval_every=2, eval_n=4, lr=1e-3, device="cpu", distributed=FSDP,
                    seed=3)


def full_weights(trainer) -> dict:
    """The whole model, gathered on this rank (collective); a tied head once, as the embeddings."""
    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    tied = trainer.model.get_output_embeddings().weight is trainer.model.get_input_embeddings().weight
    return {k: v.detach().clone().contiguous() for k, v in full.items() if not (tied and "lm_head" in k)}


def count_whole_heads(*models) -> list[int]:
    """A counter of the forwards of the models' LM head modules: the whole-logits path runs them,
    the chunked one (engine/head.head_logprobs) uses their weight without running them."""
    calls = [0]

    def count(*_):
        calls[0] += 1
    for model in models:
        model.get_output_embeddings().register_forward_hook(count)
    return calls


def head_record(heads: dict, name: str, calls: list[int], *models) -> None:
    """Whether each of `models` ran its head in chunks (engine/head registers its method on a
    sharded model at the first chunked call), and how often the head ran whole."""
    heads[name] = {"chunked": all(head.SHARDED_METHOD in vars(m) for m in models), "whole": calls[0]}


def looped(out: Path, total: int, resume: bool = False, **changes):
    """A trainer taken to step `total` by the training loop, checkpointing every 2 steps into `out`."""
    t = trainer(FSDP, **changes)
    t.cfg = dataclasses.replace(t.cfg, steps=4)  # the lr schedule of a 4-step run
    train_loop(t, out, ResilienceConfig(checkpoint_every=2, resume=resume), total, "sft")
    return t


def stepped(t, batch, out: Path, name: str, heads: dict) -> list[float]:
    """`worker.STEPS` updates of `t` on `batch`, the gathered weights saved after each as
    `<name>_step<k>-rank<r>`; records how its head ran; returns the grad norms."""
    calls = count_whole_heads(t.model)
    norms = []
    for step in range(worker.STEPS):
        t.step_idx = step
        norms.append(t.update(batch)["grad_norm"])
        save_file(full_weights(t), out / f"{name}_step{step + 1}-rank{t.sync.world.rank}.safetensors")
    head_record(heads, name, calls, t.model)
    return norms


def main(out: Path) -> None:
    # Every batch over the logits budget: the sharded model runs its LM head in chunks, apart from
    # its forward (engine/head runs them as a registered FSDP forward method of the root).
    head.LOGITS_BUDGET = 1
    heads = {}
    t = trainer(FSDP)
    rank, ranks = t.sync.world.rank, t.sync.world.size
    _, tok = worker.model()
    parts = batches(tok, ranks)
    norms = stepped(t, parts[rank], out, "fsdp", heads)
    (out / f"fsdp_grad_norms-rank{rank}.json").write_text(json.dumps(norms))
    stepped(trainer(FSDP, model=untied()), parts[rank], out, "untied", heads)

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

    stepped(trainer(FSDP, lora=LORA), parts[rank], out, "lora", heads)
    t = trainer(DistributedConfig(sync="fsdp", offload=True))
    t.update(parts[rank])
    save_file(full_weights(t), out / f"offload_step1-rank{rank}.safetensors")

    rl_parts = worker.rl_batches(tok, ranks)
    t = rl_trainer(FSDP)
    calls = count_whole_heads(t.model, t.ref)  # the policy's scores and the sharded reference's
    for step in range(worker.STEPS):
        t.step_idx = step
        t.update(rl_parts[rank])
        save_file(full_weights(t), out / f"rl_step{step + 1}-rank{rank}.safetensors")
    head_record(heads, "rl", calls, t.model, t.ref)
    for name, distributed in (("rl_idle", FSDP), ("rl_idle_ddp", DistributedConfig(sync="ddp"))):
        t = rl_trainer(distributed)
        t.update(rl_parts[0] if rank == 0 else no_data())
        save_file(full_weights(t), out / f"{name}-rank{rank}.safetensors")

    if rank == 0:
        save_model(*worker.model(), out / "tiny")
    dist.barrier()
    model, _ = load_model(out / "tiny")
    rl(model, tok, RL_STAGE, out / "rl")  # what train_stage runs, without its ending the process group
    heads["rl_stage"] = {"chunked": head.SHARDED_METHOD in vars(model)}  # rollouts ran whole, on the plain copy
    (out / f"heads-rank{rank}.json").write_text(json.dumps(heads))
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
