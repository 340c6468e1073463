"""Run by tests/distributed/test_distributed.py under `torchrun --nproc-per-node 2`: trains fresh
copies of a tiny model on fixed batches under each sync mode and saves every rank's weights and
byte counters into OUT, for the test to compare with single-process training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from keel.config import DistributedConfig, RLConfig, SFTConfig
from keel.distributed import shutdown
from keel.models import init_model, render_prompt, special_ids
from keel.rl.trainer import Batch, RLTrainer
from keel.train.sft import SFTTrainer, encode_traces, pack
from keel.tasks import get_task

STEPS = 3
NO_CLIP = 1e9


def model():
    return init_model("qwen3", layers=2, hidden=64, seed=0)


def sft_batches(tokenizer, ranks: int):
    """One packed batch per rank, of unequal token counts; the global batch is their rows together."""
    pairs = encode_traces(tokenizer, get_task("arithmetic", digits=2).examples("train", 12, seed=0))
    _, pad_id = special_ids(tokenizer)
    return [pack(pairs[r * 6:(r + 1) * 6 - r], 192, pad_id) for r in range(ranks)]  # rank 1: one pair less


def rl_batch(tokenizer, group_size: int, groups: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    examples = get_task("arithmetic", digits=2).examples("train", groups, seed=seed)
    prompts = [render_prompt(tokenizer, ex.question) for ex in examples for _ in range(group_size)]
    completions = [torch.randint(10, 40, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
                   for _ in prompts]
    rewards = torch.randint(0, 2, (len(prompts),), generator=g).float()
    return Batch(prompts, completions, rewards, rewards, torch.zeros_like(rewards),
                 torch.ones(len(prompts), dtype=torch.bool), len(prompts))


def rl_batches(tokenizer, ranks: int):
    """Per rank: its 2 groups of 4; the global batch is all ranks' groups together."""
    return [rl_batch(tokenizer, 4, 2, seed=10 + r) for r in range(ranks)]


def sft_trainer(distributed: DistributedConfig) -> SFTTrainer:
    m, tok = model()
    return SFTTrainer(m, tok, SFTConfig(task="arithmetic", task_options={"digits": 2}, examples=64,
                                        lr=1e-3, warmup=0, grad_clip=NO_CLIP, device="cpu", distributed=distributed))


def rl_trainer(distributed: DistributedConfig, sgd: bool = False, **changes) -> RLTrainer:
    m, tok = model()
    trainer = RLTrainer(m, tok, RLConfig(task="arithmetic", task_options={"digits": 2}, group_size=4, prompts_per_step=4,
                                         lr=1e-3, grad_clip=NO_CLIP, device="cpu", distributed=distributed, **changes))
    if sgd:
        trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    return trainer


def weights(trainer) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items() if "lm_head" not in k}


def main(out: Path) -> None:
    figures = {}
    ddp, diloco_as_ddp = DistributedConfig(sync="ddp"), DistributedConfig(sync="diloco", inner_steps=1, outer_lr=1.0, outer_momentum=0.0)

    t = sft_trainer(ddp)
    rank, ranks = t.sync.world.rank, t.sync.world.size
    _, tok = model()
    sft_parts = sft_batches(tok, ranks)
    setup_bytes = dict(t.sync.comm.bytes)
    for step in range(STEPS):
        t.step_idx = step
        t.update(sft_parts[rank])
    save_file(weights(t), out / f"sft_ddp-rank{rank}.safetensors")
    figures["sft_ddp"] = {"setup": setup_bytes, "total": dict(t.sync.comm.bytes)}

    t = rl_trainer(ddp)
    rl_parts = rl_batches(tok, ranks)
    for step in range(STEPS):
        t.step_idx = step
        t.update(rl_parts[rank])
    save_file(weights(t), out / f"rl_ddp-rank{rank}.safetensors")

    # A sequence mean and a token mean, micro-batched on each rank. SGD: AdamW's first steps are
    # about lr * sign(g), which turns rounding in near-cancelling gradients into 1e-5 weight gaps.
    for loss in ("grpo", "dapo"):
        t = rl_trainer(ddp, sgd=True, loss=loss, micro_batch_tokens=40)
        for step in range(STEPS):
            t.step_idx = step
            t.update(rl_parts[rank])
        save_file(weights(t), out / f"rl_{loss}_micro_ddp-rank{rank}.safetensors")

    for name, cfg in (("sgd_ddp", ddp), ("sgd_diloco", diloco_as_ddp)):
        t = rl_trainer(cfg, sgd=True)  # GRPO on 8 sequences per rank: equal shares
        for step in range(STEPS):
            t.step_idx = step
            t.update(rl_parts[rank])
            t.sync.after_step(step + 1, final=False)
        save_file(weights(t), out / f"{name}-rank{rank}.safetensors")

    for compress in ("none", "bf16", "int8"):
        t = sft_trainer(DistributedConfig(sync="diloco", inner_steps=2, compress=compress))
        before = dict(t.sync.comm.bytes)
        for step in range(4):
            t.step_idx = step
            t.update(sft_parts[rank])
            t.sync.after_step(step + 1, final=False)
        figures[f"diloco_{compress}"] = {"before": before, "total": dict(t.sync.comm.bytes)}
        save_file(weights(t), out / f"diloco_{compress}-rank{rank}.safetensors")

    (out / f"figures-rank{rank}.json").write_text(json.dumps(figures))
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
