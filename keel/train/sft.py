"""SFT cold start: teach a model the reasoning format on worked traces before RL.

The loss covers completion tokens only (the prompt is given, not learned). Sequences are packed
into fixed-length rows with position ids restarting at each sequence; transformers turns that into
a block-diagonal attention mask, so no compute is spent on padding and no sequence sees another.
Models for which that is not exact (`models.packs_exactly`: OPT, whose learned positions come from
the attention mask) get padded rows instead, one sequence per row, with a one-line notice.
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from keel.config import SFTConfig
from keel.device import autocast, pick_device
from keel.distributed import make_sync
from keel.engine import head
from keel.epochs import Epochs
from keel.errors import KeelError
from keel.models import enable_gradient_checkpointing, packs_exactly, render_prompt, special_ids, with_lora
from keel.optim import lr_factor, make_optimizer, set_lr
from keel.resilience.faults import NO_FAULTS
from keel.resilience.guard import guarded_update
from keel.resilience.state import (check_frozen, frozen_digest, load_model_state, load_optimizer_state, model_state,
                                   optimizer_state, rng_state, set_rng_state)
from keel.runlog import console
from keel.tasks import get_task
from keel.train.loop import train_loop

IGNORE = -100


@dataclass
class Packed:
    input_ids_BT: torch.Tensor
    labels_BT: torch.Tensor      # next-token targets aligned with inputs; IGNORE off the completions
    position_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor | None = None  # padded rows (`pad`) only: 1 on real tokens

    def rows(self, start: int, stop: int, device) -> "Packed":
        """Rows start:stop on `device` (a micro-batch)."""
        parts = (getattr(self, f.name) for f in dataclasses.fields(self))
        return Packed(*(None if x is None else x[start:stop].to(device) for x in parts))


def encode_traces(tokenizer, examples) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per example that has a trace."""
    eos, _ = special_ids(tokenizer)
    pairs = [(render_prompt(tokenizer, ex.question), tokenizer.encode(ex.trace, add_special_tokens=False) + [eos])
             for ex in examples if ex.trace]
    if not pairs:
        raise KeelError("the task has no reasoning traces to learn from: give the dataset a 'trace' "
                        "column (keel label writes one) or use a built-in task")
    return pairs


def drop_thinking(examples, fraction: float, seed: int):
    """Empty the think block of a seeded `fraction` of the traces, keeping the answer: SFT data as
    it often comes, part worked solutions and part bare answers."""
    rng = random.Random(f"drop-thinking:{seed}")
    return [dataclasses.replace(ex, trace=re.sub(r"<think>.*</think>", "<think></think>", ex.trace, flags=re.S))
            if ex.trace and rng.random() < fraction else ex for ex in examples]


def pack(pairs, row_len: int, pad_id: int) -> Packed:
    """Greedily fill rows of `row_len` tokens with whole sequences."""
    rows, labels, positions = [], [], []
    ids, lab, pos = [], [], []

    def close_row():
        n = row_len - len(ids)
        rows.append(ids + [pad_id] * n)
        labels.append(lab + [IGNORE] * n)
        positions.append(pos + list(range(n)))  # the pad tail is its own (ignored) sequence

    for prompt, completion in pairs:
        seq = prompt + completion
        if len(seq) > row_len:
            raise KeelError(f"a training sequence has {len(seq)} tokens, more than a packed row "
                            f"({row_len}): raise batch_tokens or shorten the traces")
        if len(ids) + len(seq) > row_len:
            close_row()
            ids, lab, pos = [], [], []
        ids += seq
        # label[t] is the token at t+1: only positions that predict a completion token count.
        lab += [IGNORE] * (len(prompt) - 1) + completion + [IGNORE]
        pos += list(range(len(seq)))
    if ids:
        close_row()
    t = lambda x: torch.tensor(x, dtype=torch.long)
    return Packed(t(rows), t(labels), t(positions))


def pad(pairs, pad_id: int) -> Packed:
    """One sequence per row, right-padded to the longest, with an attention mask: what models that
    cannot pack (`models.packs_exactly`) train on."""
    width = max(len(p) + len(c) for p, c in pairs)
    rows, labels, masks = [], [], []
    for prompt, completion in pairs:
        n = width - len(prompt) - len(completion)
        rows.append(prompt + completion + [pad_id] * n)
        labels.append([IGNORE] * (len(prompt) - 1) + completion + [IGNORE] * (n + 1))
        masks.append([1] * (width - n) + [0] * n)
    t = lambda x: torch.tensor(x, dtype=torch.long)
    return Packed(t(rows), t(labels), torch.arange(width).repeat(len(pairs), 1), t(masks))


class Batches(Epochs):
    """An endless, seeded stream of batches over (prompt, completion) pairs: packed rows, or with
    `packed=False` padded ones (`pad`), of about `batch_tokens` real tokens either way."""

    def __init__(self, pairs, batch_tokens: int, pad_id: int, seed: int, packed: bool = True):
        super().__init__(pairs, seed)
        self.batch_tokens, self.pad_id, self.packed = batch_tokens, pad_id, packed
        self.row_len = min(batch_tokens, max(256, max(len(p) + len(c) for p, c in pairs)))

    def next(self) -> Packed:
        chosen, tokens = [], 0
        while True:
            pair = self.peek()
            n = len(pair[0]) + len(pair[1])
            if chosen and tokens + n > self.batch_tokens:
                return pack(chosen, self.row_len, self.pad_id) if self.packed else pad(chosen, self.pad_id)
            chosen.append(pair)
            tokens += n
            self.cursor += 1


def completion_loss(model, batch: Packed, logits_budget: int | None = None) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over completion tokens, and how many there were. Past
    `logits_budget` elements of logits (default LOGITS_BUDGET), only the completion positions go
    through the LM head, in chunks (engine.head.head_logprobs): the [B, T, V] logits are never built."""
    forward = dict(input_ids=batch.input_ids_BT, position_ids=batch.position_ids_BT, use_cache=False)
    if batch.attention_mask_BT is not None:
        forward["attention_mask"] = batch.attention_mask_BT
    predicts_BT = batch.labels_BT != IGNORE
    n = int(predicts_BT.sum())
    if head.chunked_head(model, batch.labels_BT.numel(), head.LOGITS_BUDGET if logits_budget is None else logits_budget):
        logp_N, _ = head.head_logprobs(model, forward, predicts_BT, batch.labels_BT[predicts_BT], 1.0, False)
        return -logp_N.mean(), n
    logits = model(**forward).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch.labels_BT.flatten(), ignore_index=IGNORE)
    return loss, n


class SFTTrainer:
    """One packed batch per step, driven by the shared training loop (train/loop.py); state()
    holds everything needed to continue exactly.
    Under torchrun each rank trains on its own shard of the traces, `batch_tokens / ranks` per step.
    With `cfg.lora` (or a model `models.add_lora` wrapped) only the adapters train: `self.peft` is the
    peft wrapper, `self.model` the transformers model inside it, adapters included."""

    def __init__(self, model, tokenizer, cfg: SFTConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.peft, model = with_lora(model, cfg.lora, cfg.seed)
        # LoRA checkpoints hold the adapters only; this says which base weights they belong to.
        self.base_digest = frozen_digest(model) if self.peft is not None else None
        self.model = model.to(self.device).train()
        enable_gradient_checkpointing(self.model, cfg.gradient_checkpointing)
        packs = packs_exactly(self.model, cfg.batch_tokens)  # before any wrapping: a plain local forward
        self.sync = make_sync(cfg.distributed, self.model, self.device)
        rank, ranks = self.sync.world.rank, self.sync.world.size
        task = get_task(cfg.task, **cfg.task_options)
        examples = drop_thinking(task.examples("train", cfg.examples, seed=cfg.seed), cfg.drop_thinking, cfg.seed)
        _, pad_id = special_ids(tokenizer)
        pairs = encode_traces(tokenizer, examples)[rank::ranks]
        if not pairs or cfg.batch_tokens // ranks < 16:
            raise KeelError(f"sft: {ranks} ranks need at least {ranks} traces and batch_tokens >= {16 * ranks}")
        self.batches = Batches(pairs, cfg.batch_tokens // ranks, pad_id, cfg.seed, packed=packs)
        if not packs and self.sync.world.main:
            console.print(f"sft: {type(self.model).__name__} computes packed sequences differently from single ones; "
                          "training on padded batches instead", style="yellow", highlight=False, markup=False,
                          soft_wrap=True)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)
        self.step_idx = 0

    def step(self, injector=NO_FAULTS, apply: bool = True) -> dict:
        cfg = self.cfg
        lr = cfg.lr * lr_factor(self.step_idx, cfg.warmup, cfg.steps, "cosine")
        set_lr(self.optimizer, lr)
        batch = self.batches.next()
        self.step_idx += 1
        row = {"stage": "sft", "step": self.step_idx, "lr": lr, "epoch": self.batches.epoch}
        return {**row, **self.update(batch, injector)} if apply else row

    def update(self, batch: Packed, injector=NO_FAULTS) -> dict:
        """One optimizer step on `batch` (this rank's part of the global batch), its rows split
        into micro-batches of at most `micro_batch_tokens` whose gradients add up to the batch's."""
        t0 = time.perf_counter()
        n_tokens = int((batch.labels_BT != IGNORE).sum())
        share = self.sync.share(n_tokens)  # the mean over every rank's tokens, not of rank means
        rows = max(1, self.cfg.micro_batch_tokens // batch.input_ids_BT.shape[1])
        starts = range(0, len(batch.input_ids_BT), rows)
        passes = self.sync.passes(len(starts))  # fsdp: as many as the rank with the most micro-batches

        def backward(loss_scale: float) -> float:
            loss = 0.0
            for i in range(passes):  # beyond this rank's micro-batches (fsdp): its first again, weighing 0
                start = starts[i] if i < len(starts) else 0
                micro = batch.rows(start, start + rows, self.device)
                with autocast(self.device, self.cfg.dtype):
                    micro_loss, n = self.sync.run(lambda m: completion_loss(m, micro), last=i == passes - 1)
                weight = n / n_tokens if i < len(starts) else 0.0  # a token mean over the micro-batch -> over the batch
                weighted = micro_loss * weight
                (weighted * share * loss_scale).backward()
                loss += weighted.item()
            return loss

        loss, grad_norm, applied = guarded_update(self.model, self.optimizer, backward, self.cfg.grad_clip,
                                                  injector, self.step_idx, self.sync)
        dt = time.perf_counter() - t0
        return {"loss": loss, "grad_norm": grad_norm, "tokens": n_tokens,
                "tokens_per_s": batch.input_ids_BT.numel() / dt, "step_s": dt,
                **({} if applied else {"skipped": "nonfinite"})}

    def state(self):
        opt_tensors, opt_meta = optimizer_state(self.optimizer, self.model)
        rng_tensors, rng_meta = rng_state()
        lora = self.peft is not None
        tensors = {"model": model_state(self.model, trainable_only=lora), "optimizer": opt_tensors, "rng": rng_tensors}
        meta = {"step": self.step_idx, "data": {"epoch": self.batches.epoch, "cursor": self.batches.cursor},
                "optimizer": opt_meta, "rng": rng_meta}
        return tensors, ({**meta, "base_sha256": self.base_digest} if lora else meta)

    def load_state(self, tensors, state) -> None:
        check_frozen(state.get("base_sha256"), self.base_digest)
        load_model_state(self.model, tensors["model"], trainable_only=self.peft is not None)
        load_optimizer_state(self.optimizer, tensors.get("optimizer", {}), state["optimizer"], self.model)
        set_rng_state(tensors["rng"], state["rng"])
        self.step_idx = state["step"]
        self.batches.seek(state["data"]["epoch"], state["data"]["cursor"])


def sft(model, tokenizer, cfg: SFTConfig, out: str | Path) -> list[dict]:
    """Train `model` in place; metrics and checkpoints go to `out`. Returns the metrics rows.
    Under fsdp `model` is left sharded over the ranks: `distributed.sync.full_state` gathers it
    (train/stage.py does, for OUT/model)."""
    trainer = SFTTrainer(model, tokenizer, cfg)
    rows = train_loop(trainer, out, cfg.resilience, cfg.steps, "sft")
    model.eval()
    return rows
