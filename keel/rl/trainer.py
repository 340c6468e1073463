"""The RL loop: rollouts -> rewards -> advantages -> loss -> step, for every GRPO-family loss.

One step: draw `prompts_per_step` training prompts, sample `group_size` completions of each,
score them with the task's verifier, turn rewards into group-relative advantages, then take
`updates_per_batch` optimizer steps on that batch with old log-probs held fixed. The variants
(GRPO, Dr. GRPO, DAPO, GSPO) are each one `LossSpec` (keel/config.py): advantage scaling, clip
range, ratio level, aggregation and which sampling rules are on. This loop reads the spec and
never asks which loss it runs.

Rollouts are sampled by the trainer's own model, or with `cfg.rollout` by another backend (a torch
copy in another dtype or on another device, ONNX Runtime, or vLLM), which gets the trainer's full
weights as a state dict (under LoRA with the adapters merged in: keel.models.LoraMerge) before a
step's rollouts whenever they changed. Then the trainer re-scores the rollouts in PyTorch
(pi_old) and weights each token's loss by the off-policy correction of pi_old against the
sampler's own log-probs (mu): keel/correction.py. With `async_steps: 1` the sampler (a copy, if not another
backend) samples step n+1's batch in a worker thread while the trainer learns from step n's
(keel/rl/overlap.py); the batch in flight is part of the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from keel.completions import complete
from keel.config import EvalConfig, RLConfig, RolloutConfig
from keel.device import autocast, make_generator, pick_device, supports_bf16, synchronize
from keel.distributed import make_sync
from keel.distributed.sync import full_state
from keel.epochs import Epochs
from keel.errors import KeelError
from keel.evaluate import evaluate
from keel.models import LoraMerge, enable_gradient_checkpointing, merged_copy, special_ids, with_lora
from keel.optim import lr_factor, make_optimizer, set_lr
from keel.resilience.faults import NO_FAULTS
from keel.resilience.guard import guarded_update
from keel.resilience.state import (check_frozen, frozen_digest, is_sharded, load_model_state, load_optimizer_state,
                                   model_state, optimizer_state, rng_state, set_rng_state)
from keel.rl.advantages import group_advantages, groups_with_signal, overlong_penalty
from keel.correction import correction_weights, mismatch_stats, resolve_correction
from keel.rl.losses import batch_units, policy_loss, rows_with_gradient
from keel.rl.overlap import Overlap
from keel.engine.backends import OrtBackend, TorchBackend
from keel.engine.vllm_backend import VllmSampler
from keel.engine.sampler import SamplingParams, completion_logprobs, packed_completion_logprobs
from keel.tasks import get_task
from keel.train.loop import train_loop

TRAIN_POOL = 4096  # distinct training prompts drawn from a generated task
RANK_SEED_STRIDE = 1_000_003  # rank r samples with seed + r * stride: its own stream, rank 0's as in one process


@dataclass
class Batch:
    """One step's scored rollouts, group-contiguous."""
    prompts: list[list[int]]
    completions: list[list[int]]
    rewards_B: torch.Tensor
    correct_B: torch.Tensor
    format_B: torch.Tensor
    finished_B: torch.Tensor
    sampled: int  # completions generated to fill this batch (dynamic sampling may discard some)
    logprobs: list[list[float]] | None = None  # per completion token, under the sampling policy

    def sampling_logprobs(self, device) -> torch.Tensor:
        """The sampler's log-probs as [B, C] (completion_logprobs' layout), zeros past each end."""
        C = max(len(c) for c in self.completions)
        return torch.tensor([row + [0.0] * (C - len(row)) for row in self.logprobs], device=device)

    def subset(self, rows: list[int]) -> "Batch":
        """The batch's `rows`, in that order."""
        pick = lambda values: None if values is None else [values[i] for i in rows]  # noqa: E731
        index = torch.tensor(rows, dtype=torch.long)
        return Batch(pick(self.prompts), pick(self.completions), self.rewards_B[index], self.correct_B[index],
                     self.format_B[index], self.finished_B[index], len(rows), pick(self.logprobs))

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able meta) that `from_state` turns back into this batch exactly: token ids
        and counts as JSON, rewards, flags and log-probs (float64 holds any Python float) as tensors."""
        tensors = {"rewards": self.rewards_B, "correct": self.correct_B, "format": self.format_B,
                   "finished": self.finished_B}
        if self.logprobs is not None:
            tensors["logprobs"] = torch.tensor([x for row in self.logprobs for x in row], dtype=torch.float64)
        return tensors, {"prompts": self.prompts, "completions": self.completions, "sampled": self.sampled}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "Batch":
        logprobs = None
        if "logprobs" in tensors:
            flat, ends = tensors["logprobs"].tolist(), itertools.accumulate(len(c) for c in meta["completions"])
            logprobs = [flat[end - len(c):end] for c, end in zip(meta["completions"], ends)]
        return cls(meta["prompts"], meta["completions"], tensors["rewards"], tensors["correct"], tensors["format"],
                   tensors["finished"], meta["sampled"], logprobs)

    def micro_batches(self, max_tokens: int, packed: bool = False) -> list[list[int]]:
        """Consecutive rows, grouped so that each group's forward stays within `max_tokens`: its
        padded size (rows x (longest prompt + longest completion)), or packed, its real tokens. A
        row longer than that goes alone."""
        groups, rows, longest_p, longest_c, real = [], [], 0, 0, 0
        for i, (p, c) in enumerate(zip(self.prompts, self.completions)):
            lp, lc = max(longest_p, len(p)), max(longest_c, len(c))
            cost = real + len(p) + len(c) if packed else (len(rows) + 1) * (lp + lc)
            if rows and cost > max_tokens:
                groups.append(rows)
                rows, lp, lc, real = [], len(p), len(c), 0
            rows.append(i)
            longest_p, longest_c, real = lp, lc, real + len(p) + len(c)
        return groups + [rows] if rows else groups


def merge_stats(parts: list[tuple[dict, float, float, float]]) -> dict:
    """clip_frac and kl of the whole batch from its micro-batches' (stats, ratio units, tokens, _):
    each is a mean over its micro-batch's ratio units (tokens, or sequences) or tokens. One
    micro-batch's stats are taken as they are, so a batch that fits one forward logs what it did
    before micro-batching."""
    if len(parts) == 1:
        return {"clip_frac": parts[0][0]["clip_frac"], "kl": parts[0][0]["kl"]}
    ratio_units, tokens = sum(p[1] for p in parts), sum(p[2] for p in parts)
    return {"clip_frac": sum(s["clip_frac"] * n for s, n, _, _ in parts) / max(1.0, ratio_units),
            "kl": sum(s["kl"] * t for s, _, t, _ in parts) / max(1.0, tokens)}


def plain_model(config, weights: dict[str, torch.Tensor], device):
    """A plain transformers model of `config` holding `weights` (a model's full state by name), in
    their dtype, on `device`, in eval mode."""
    dtype = next(t.dtype for t in weights.values() if t.is_floating_point())
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(weights)
    return model.to(device).eval()


def train_prompts(task, seed: int) -> list:
    """As many distinct training prompts as the task has, up to TRAIN_POOL; small tasks (1-digit
    sums, short files) refuse large requests, so ask for less until they agree."""
    n = TRAIN_POOL
    while True:
        try:
            return task.examples("train", n, seed=seed)
        except KeelError:
            if n <= 8:
                raise
            n //= 2


class RLTrainer:
    """RL with one loss of the GRPO family; the shared training loop drives it (train/loop.py).
    Under torchrun each rank samples `prompts_per_step / ranks` prompts per step from its own
    shard of the prompt pool, with its own sampling seed.
    With `cfg.lora` (or a model `models.add_lora` wrapped) only the adapters train: `self.peft` is the
    peft wrapper, `self.model` the transformers model inside it, adapters included; the KL
    reference is then that model with its adapters switched off, not a copy."""

    def __init__(self, model, tokenizer, cfg: RLConfig):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.device = pick_device(cfg.device)
        self.peft, model = with_lora(model, cfg.lora, cfg.seed)
        # LoRA checkpoints hold the adapters only; this says which base weights they belong to.
        self.base_digest = frozen_digest(model) if self.peft is not None else None
        self.model = model.to(self.device)
        enable_gradient_checkpointing(self.model, cfg.gradient_checkpointing)
        # The rollout sampler and the KL reference are copies of the plain model, taken before
        # make_sync: under fsdp it shards self.model in place (and the reference alike). Under LoRA
        # the sampler holds the plain model with the adapters merged in, and gets merged weights.
        self.merge = LoraMerge(self.model) if self.peft is not None else None
        self.sampler, self.sampler_is_trainer = self._make_sampler()
        if cfg.async_steps and self.sampler is None:  # the model trains while its copy samples the next batch
            self.sampler = TorchBackend(self.plain_copy(), self.device, "fp32")
        self.ref = None
        if cfg.beta > 0 and self.peft is None:  # the frozen initial policy for the KL term
            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.sync = make_sync(cfg.distributed, self.model, self.device, frozen=() if self.ref is None else (self.ref,))
        self.sharded = is_sharded(self.model)
        rank, ranks = self.sync.world.rank, self.sync.world.size
        if cfg.prompts_per_step % ranks:
            raise KeelError(f"rl: prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the number "
                            f"of ranks ({ranks})")
        self.prompts_per_rank = cfg.prompts_per_step // ranks
        self.task = get_task(cfg.task, **cfg.task_options)
        self.eos_id, self.pad_id = special_ids(tokenizer)
        self.prompts = Epochs(train_prompts(self.task, cfg.seed)[rank::ranks], cfg.seed)
        self.correction = resolve_correction(cfg.correction, self.sampler_is_trainer, cfg.async_steps)
        sampler_device = self.device if self.sampler is None else self.sampler.device
        self.generator = make_generator(sampler_device, cfg.seed + RANK_SEED_STRIDE * rank)
        self.optimizer = make_optimizer(self.model, cfg.lr)
        self.loss = cfg.loss_spec
        self.dynamic = cfg.dynamic_sampling_on
        self.overlong = cfg.overlong_tokens
        self.sampling = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
        self.step_idx = 0
        self.pending: Batch | None = None  # async_steps 1: the next step's batch, sampled during this one
        self.sampler_stale = True  # whether the trainer's weights changed since the sampler last got them
        self.eval_model = None  # fsdp, a sampler that is no torch copy: rank 0's plain copy for evaluate_every
        self.overlap = Overlap() if cfg.async_steps else None

    # -- rollouts ----------------------------------------------------------------------------
    def _make_sampler(self):
        """(the rollout backend or None, whether it computes exactly what the trainer computes).
        None is the trainer's own model. A torch copy in fp32 on the trainer's device, while the
        trainer runs in fp32, runs today's sampling code on the same weights: it IS the trainer
        (its log-probs match the trainer's to the rounding the trainer's own sampler has).
        Under sync: fsdp the trainer's model is sharded and cannot sample: each rank's decode loop
        runs as many forwards as its own completions need, and every forward of a sharded model is
        a collective that the other ranks would have to join. So without `rollout` each rank samples
        on a plain copy (RolloutConfig(): torch, fp32, the trainer's device) fed the gathered full
        weights: on an fp32 trainer that copy is the trainer too, since FSDP's forward on the
        gathered weights is the plain model's forward (fp32 all the way on CPU: no mixed precision).
        Under LoRA every backend samples the plain model with the adapters merged in (peft's merge,
        on a copy): the same function to float rounding, not the same arithmetic, so not the trainer."""
        r = self.cfg.rollout
        if r is None and self.cfg.distributed.sharded:  # fsdp, or diloco over groups of ranks
            r = RolloutConfig()
        if r is None:
            return None, True
        if r.backend != "torch":  # they export or save the plain model (LoRA: a merged copy), not keep it
            plain = merged_copy(self.peft) if self.peft is not None else self.model
            if r.backend == "onnxruntime":
                return OrtBackend.from_model(plain, r.provider, dtype=r.dtype), False
            rows = self.cfg.rollout_batch_size or self.cfg.prompts_per_step * self.cfg.group_size
            return VllmSampler.from_model(plain, device=r.device, dtype=r.dtype, seed=self.cfg.seed,
                                          max_batch=rows), False
        device = self.device if r.device == "auto" else pick_device(r.device)
        trainer_fp32 = self.cfg.dtype == "fp32" or (self.cfg.dtype == "auto" and not supports_bf16(self.device))
        same = device == self.device and r.dtype == "fp32" and trainer_fp32 and self.peft is None
        return TorchBackend(self.plain_copy(), device, r.dtype), same

    def plain_copy(self) -> torch.nn.Module:
        """A plain transformers copy of the model for a torch sampler: under LoRA with the adapters
        merged in (peft's merge, on a copy), as `rollout_weights` then keeps it."""
        return merged_copy(self.peft) if self.peft is not None else copy.deepcopy(self.model)

    def rollout_weights(self) -> dict[str, torch.Tensor]:
        """The trainer's full weights by name, as the sampler takes them: a sharded model's gathered
        from every rank's shards (a collective), under LoRA with the adapters merged in."""
        state = full_state(self.model)
        return state if self.merge is None else self.merge(state)

    def sync_sampler(self, for_eval: bool = False) -> float:
        """Copy the trainer's weights into the rollout backend; the seconds it took. A sharded
        model's full weights are gathered first, on every rank (a collective all ranks run at the
        same point, so every rank's copy gets them: nothing to broadcast). `for_eval`: rank 0 also
        keeps a plain torch model of them for `evaluate_every` if the sampler is not one."""
        t0 = time.perf_counter()
        weights = self.rollout_weights()
        self.sampler.load_weights(weights)
        synchronize(self.sampler.device)
        self.sampler_stale = False
        if for_eval and not self.samples_fp32_torch() and self.sync.world.main:
            self.eval_model = plain_model(self.model.config, weights, self.device)
        return time.perf_counter() - t0

    def samples_fp32_torch(self) -> bool:
        """Whether the sampler is a torch copy holding the weights in fp32, as they are gathered."""
        return isinstance(self.sampler, TorchBackend) and self.sampler.dtype == torch.float32

    def _rollout(self, examples) -> Batch:
        if self.sampler is None:
            sampler, precision = self.model, autocast(self.device, self.cfg.dtype)
        else:  # the backend holds its weights in its own dtype
            sampler = self.sampler.model if isinstance(self.sampler, TorchBackend) else self.sampler
            precision = contextlib.nullcontext()
        with precision:
            out = complete(sampler, self.tokenizer, [ex.question for ex in examples], self.sampling,
                           k=self.cfg.group_size, generator=self.generator,
                           reward=lambda text, i: self.task.reward(text, examples[i]),
                           batch_size=self.cfg.rollout_batch_size or None, compile=self.cfg.compile,
                           eos_id=self.eos_id)
        correct = torch.tensor([s["correct"] for s in out.scores])
        fmt = torch.tensor([s["format"] for s in out.scores])
        rewards = correct + self.cfg.format_weight * fmt
        if self.overlong:
            # An unfinished completion ran past the budget: DAPO's "> L_max" regime.
            lengths = torch.tensor([len(t) + (0 if f else 1) for t, f in zip(out.tokens, out.finished)])
            rewards = rewards + overlong_penalty(lengths, self.cfg.max_new_tokens, self.overlong)
        return Batch(out.prompts, out.tokens, rewards, correct, fmt, torch.tensor(out.finished), len(out.prompts),
                     out.logprobs)

    def collect(self) -> Batch:
        """This rank's batch of `prompts_per_rank` groups. With dynamic sampling, groups whose rewards
        are all equal (no learning signal) are dropped and more prompts are drawn, up to
        `max_refills` rounds."""
        cfg, G, n = self.cfg, self.cfg.group_size, self.prompts_per_rank
        if not self.dynamic:
            return self._rollout(self.prompts.take(n))
        kept, sampled = [], 0
        for _ in range(cfg.max_refills + 1):
            batch = self._rollout(self.prompts.take(n))
            sampled += batch.sampled
            keep = groups_with_signal(batch.rewards_B, G)
            kept += [(batch, g) for g in range(len(keep)) if keep[g]]
            if len(kept) >= n:
                break
        rows = [(b, i) for b, g in kept[:n] for i in range(g * G, (g + 1) * G)]
        pick = lambda name: [getattr(b, name)[i] for b, i in rows]
        stack = lambda name: torch.stack(pick(name)) if rows else torch.zeros(0)
        return Batch(pick("prompts"), pick("completions"), stack("rewards_B"), stack("correct_B"),
                     stack("format_B"), stack("finished_B"), sampled, pick("logprobs"))

    # -- update ------------------------------------------------------------------------------
    def _logprobs(self, model, batch: Batch, with_entropy: bool = False):
        with autocast(self.device, self.cfg.dtype):
            if self.cfg.padding_free:
                return packed_completion_logprobs(model, batch.prompts, batch.completions,
                                                  temperature=self.cfg.temperature, with_entropy=with_entropy)
            return completion_logprobs(model, batch.prompts, batch.completions, pad_id=self.pad_id,
                                       temperature=self.cfg.temperature, with_entropy=with_entropy)

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """[B, C] log-probs of `batch`'s completions under the frozen initial policy, without grad:
        the reference copy, or with LoRA the same model with its adapters off (B starts at zero,
        so the base model is the initial policy), in eval mode as the copy is."""
        with torch.no_grad():
            if self.ref is not None:
                return self._logprobs(self.ref, batch)[0]
            was_training = self.model.training
            self.model.eval()
            try:
                with self.peft.disable_adapter():
                    return self._logprobs(self.model, batch)[0]
            finally:
                self.model.train(was_training)

    def step(self, injector=NO_FAULTS, apply: bool = True) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = cfg.lr * lr_factor(self.step_idx, cfg.warmup, cfg.steps, cfg.lr_schedule)
        set_lr(self.optimizer, lr)
        # The weights reach the sampler before a step's rollouts if they changed since it last got
        # them: after an update, after a resume; not after a skipped step, nor after a step whose
        # evaluation gathered them already (fsdp).
        sync_s = self.sync_sampler() if self.sampler is not None and self.sampler_stale else 0.0
        if self.overlap is None:
            batch = self.collect()
        else:  # train on the batch sampled during the last step; sample the next one meanwhile
            batch = self.pending if self.pending is not None else self.sample_now()
            self.pending = None
            self.overlap.start(self.collect)
        row = {"stage": "rl", "step": self.step_idx + 1, "lr": lr, "sampled": batch.sampled,
               "groups": len(batch.completions) // cfg.group_size, "rollout_s": time.perf_counter() - t0 - sync_s}
        if self.sampler is not None:
            row["weight_sync_s"] = sync_s
        try:
            # A batch without a group with signal (dynamic sampling) is skipped when every rank's is.
            if not apply or not self.sync.any(bool(batch.completions)):
                row = {**row, "skipped": "no_signal"} if apply else row
            else:
                row.update(self.update(batch, injector))
        finally:
            if self.overlap is not None:  # the next batch is ready before the sampler gets new weights
                self.pending = self.overlap.join()
                row["rollout_s"] += self.overlap.waited_s
        self.step_idx += 1
        if self.sharded and self.eval_due():
            # evaluate_every (rank 0 alone) cannot run the sharded model: every rank gathers the
            # weights now, for its sampler, and the next step's rollouts reuse them (one gather a step).
            row["weight_sync_s"] += self.sync_sampler(for_eval=True)
        if "tokens" in row:
            row["step_s"] = time.perf_counter() - t0
            row["tokens_per_s"] = row.pop("tokens") / row["step_s"]
        return row

    def sample_now(self) -> Batch:
        """A batch sampled in the sampling thread, waited for: every rollout of an async run is
        drawn there, with the same thread count."""
        self.overlap.start(self.collect)
        return self.overlap.join()

    def update(self, batch: Batch, injector=NO_FAULTS) -> dict:
        """`updates_per_batch` optimizer steps on this rank's `batch`; returns its metrics. Each step
        runs the batch in micro-batches of at most `micro_batch_tokens` and accumulates their
        gradients, each micro-batch's loss weighted by its share of the batch's units (sequences, or
        tokens for a token mean), so the update is the one-batch update to float rounding.

        Rows whose gradient is exactly 0 (zero advantage without a KL term:
        `losses.rows_with_gradient`) are not run; their units still count, so the loss, the
        gradient and clip_frac are those of the whole batch to float rounding, while `entropy` and
        the mismatch stats are over the rows trained on. `rows_skipped` is their share of the batch.

        Every rank runs `Sync.passes` forward and backward passes, at least one: under fsdp as many
        as the busiest rank (each is a collective), under ddp one at least (its last pass
        all-reduces the gradients). A rank with fewer micro-batches than that (none at all, when
        dynamic sampling left it no data or every row was skipped) runs the rest as passes of zero
        weight on stand-in rows (`stand_in`): zero gradients, stepped on as any others."""
        cfg, spec = self.cfg, self.loss
        lengths = [len(c) for c in batch.completions]
        adv_B = (group_advantages(batch.rewards_B, cfg.group_size, scale_by_std=spec.scale_by_std) if lengths
                 else torch.zeros(0)).to(self.device)
        units = batch_units(spec, lengths)
        trained = rows_with_gradient(adv_B, cfg.beta)
        train = batch if len(trained) == len(lengths) else batch.subset(trained)
        adv_B, train_lengths = adv_B[trained], [lengths[i] for i in trained]
        micro = [(rows, train.subset(rows)) for rows in train.micro_batches(cfg.micro_batch_tokens, cfg.padding_free)]
        passes = self.sync.passes(max(1, len(micro)))
        stand_in = micro[-1][1] if micro else self.stand_in()
        stand_ins = passes - len(micro)
        self.model.train()
        old_logp = ref_logp = [None] * len(micro)
        # Another sampler's log-probs (mu) differ from the trainer's (pi_old): each token's loss is
        # weighted by the correction of pi_old / mu, computed once per micro-batch.
        mu_logp = [None] * len(micro)
        if self.sampler is not None and train.logprobs is not None:
            mu_logp = [part.sampling_logprobs(self.device) for _, part in micro]
        corrections = {}  # micro-batch -> (weight_BT or None, its real tokens' log-ratios, weights, corrected)
        if cfg.updates_per_batch > 1:
            # The policy moves between updates, so the ratios need the sampling policy's log-probs:
            # when the sampler is the trainer it recorded them (equal to a re-scoring forward to float
            # rounding in fp32), which spares that forward. Another sampler's are not pi_old's, nor
            # are those of a sampler a step behind (async_steps), and batches built by hand may come
            # without them: re-score.
            if train.logprobs is not None and self.sampler_is_trainer and not cfg.async_steps:
                old_logp = [part.sampling_logprobs(self.device) for _, part in micro]
            else:
                with torch.no_grad():
                    old_logp = [self._logprobs(self.model, part)[0] for _, part in micro]
                    for _ in range(stand_ins):
                        self._logprobs(self.model, stand_in)
        if cfg.beta > 0:
            ref_logp = [self.reference_logprobs(part) for _, part in micro]
            for _ in range(stand_ins):
                self.reference_logprobs(stand_in)
        skipped = 0
        for _ in range(cfg.updates_per_batch):
            # Weighted so that the ranks' averaged gradient is that of the loss over all their units.
            share = self.sync.share(units)
            parts = []  # per micro-batch: (stats, ratio units, tokens, entropy sum)

            def backward(loss_scale: float) -> float:
                loss = 0.0
                for k, (rows, part) in enumerate(micro):
                    logp, mask, entropy = self.sync.run(lambda m: self._logprobs(m, part, with_entropy=True),
                                                        last=k == passes - 1)
                    old = logp.detach() if old_logp[k] is None else old_logp[k]
                    if mu_logp[k] is not None and k not in corrections:
                        corrections[k] = self._correction(old, mu_logp[k], mask)
                    micro_loss, stats = policy_loss(logp, old, adv_B[rows], mask, spec=spec, norm_len=cfg.max_new_tokens,
                                                    ref_logp_BT=ref_logp[k], beta=cfg.beta,
                                                    is_weight_BT=corrections[k][0] if k in corrections else None)
                    weighted = micro_loss * (batch_units(spec, [train_lengths[i] for i in rows]) / units)
                    (weighted * share * loss_scale).backward()
                    loss += weighted.item()
                    ratio_units = mask.sum() if spec.ratio == "token" else (mask.sum(1) > 0).sum()
                    parts.append((stats, ratio_units.item(), mask.sum().item(), (entropy * mask).sum().item()))
                for k in range(len(micro), passes):
                    logp = self.sync.run(lambda m: self._logprobs(m, stand_in)[0], last=k == passes - 1)
                    (logp.sum() * 0.0).backward()
                return loss

            loss, grad_norm, applied = guarded_update(self.model, self.optimizer, backward, cfg.grad_clip, injector,
                                                      self.step_idx + 1, self.sync)
            skipped += not applied
        self.sampler_stale = True
        self.model.eval()
        if not lengths:
            return {"grad_norm": grad_norm, "tokens": 0}
        skipped_lengths = [lengths[i] for i in sorted(set(range(len(lengths))) - set(trained))]
        if skipped_lengths:  # zero advantage is never clipped (clip_frac counts A > 0 or A < 0), but counts
            ratio_units = sum(skipped_lengths) if spec.ratio == "token" else sum(n > 0 for n in skipped_lengths)
            parts.append(({"clip_frac": 0.0, "kl": 0.0}, ratio_units, sum(skipped_lengths), 0.0))
        row = {
            "loss": loss, "reward": batch.rewards_B.mean().item(),
            "reward_correct": batch.correct_B.mean().item(), "reward_format": batch.format_B.mean().item(),
            "accuracy": batch.correct_B.mean().item(), "response_length": torch.tensor(lengths).float().mean().item(),
            "truncated": 1 - batch.finished_B.float().mean().item(), **merge_stats(parts),
            "grad_norm": grad_norm, "tokens": sum(lengths), "rows_skipped": len(skipped_lengths) / len(lengths),
        }
        if train_lengths:  # measured on the rows trained on: none, no entropy (not a misleading 0)
            row["entropy"] = sum(p[3] for p in parts) / max(1, sum(train_lengths))
        if self.sampler is not None and batch.logprobs is not None:  # over the trained tokens (none: zeros)
            row.update(mismatch_stats(*(torch.cat([c[i] for c in corrections.values()]) if corrections
                                        else torch.zeros(0) for i in (1, 2, 3))))
        if skipped:  # counted per update; the row says the step lost at least one
            row["skipped"] = "nonfinite"
        return row

    def stand_in(self) -> Batch:
        """A group of one-token completions: the rows a rank without micro-batches of its own runs
        its zero-weight passes on (`update`)."""
        G, zeros = self.cfg.group_size, torch.zeros(self.cfg.group_size)
        return Batch([[self.eos_id]] * G, [[self.eos_id]] * G, zeros, zeros, zeros, torch.ones(G, dtype=torch.bool), 0,
                     [[0.0]] * G)

    def _correction(self, old_logp_BT, mu_logp_BT, mask_BT):
        """(the loss weights, None for `none`; and the real tokens' log-ratios, weights and
        corrected flags for the logged stats)."""
        cfg = self.cfg
        log_ratio_BT = old_logp_BT.detach() - mu_logp_BT
        weight_BT, corrected_BT = correction_weights(log_ratio_BT, mask_BT, self.correction, cap=cfg.correction_cap,
                                                     low=cfg.icepop_low, high=cfg.icepop_high)
        real = mask_BT.bool()
        return (None if self.correction == "none" else weight_BT, log_ratio_BT[real], weight_BT[real],
                corrected_BT[real])

    def eval_due(self) -> bool:
        """Whether the step just taken ends with a held-out evaluation."""
        cfg = self.cfg
        return bool(cfg.eval_every) and (self.step_idx % cfg.eval_every == 0 or self.step_idx == cfg.steps)

    def evaluate_every(self, row: dict, eval_cfg: EvalConfig | None) -> None:
        """Held-out greedy pass@1 every `eval_every` steps, added to the step's row. It runs on
        rank 0 alone, so under fsdp not on the sharded model (its forwards are collectives) but on
        the trainer's weights gathered by `step`: in the rollout copy if that is a torch model in
        fp32, else in a plain torch model made of them for this evaluation (an onnxruntime, vllm or
        bf16 sampler would score another policy than the trainer's)."""
        cfg = self.cfg
        if self.eval_due():
            eval_cfg = eval_cfg or EvalConfig(task=cfg.task, task_options=cfg.task_options, n=cfg.eval_n,
                                              max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
            model = self.model
            if self.sharded:
                model = self.sampler.model if self.eval_model is None else self.eval_model
                self.eval_model = None
            row["test_pass@1"] = evaluate(model, self.tokenizer, eval_cfg, task=self.task, samples=False)["pass@1"]

    # -- checkpoint state --------------------------------------------------------------------
    def state(self):
        opt_tensors, opt_meta = optimizer_state(self.optimizer)
        rng_tensors, rng_meta = rng_state()
        lora = self.peft is not None
        tensors = {"model": model_state(self.model, trainable_only=lora), "optimizer": opt_tensors,
                   "rng": {**rng_tensors, "sampler": self.generator.get_state()}}
        if self.ref is not None:
            tensors["ref"] = model_state(self.ref)
        meta = {"step": self.step_idx, "data": {"epoch": self.prompts.epoch, "cursor": self.prompts.cursor},
                "optimizer": opt_meta, "rng": rng_meta}
        if self.pending is not None:  # async_steps 1: the batch sampled for the next step (this rank's)
            tensors["data"], meta["data"]["pending"] = self.pending.to_state()
        return tensors, ({**meta, "base_sha256": self.base_digest} if lora else meta)

    def load_state(self, tensors, state) -> None:
        check_frozen(state.get("base_sha256"), self.base_digest)
        load_model_state(self.model, tensors["model"], trainable_only=self.peft is not None)
        if self.ref is not None:
            load_model_state(self.ref, tensors["ref"])
        load_optimizer_state(self.optimizer, tensors.get("optimizer", {}), state["optimizer"])
        set_rng_state(tensors["rng"], state["rng"])
        self.generator.set_state(tensors["rng"]["sampler"])
        self.step_idx = state["step"]
        self.sampler_stale = True
        self.prompts.seek(state["data"]["epoch"], state["data"]["cursor"])
        pending = state["data"].get("pending")
        if self.overlap is not None:  # a checkpoint without one (async_steps 0 wrote it) samples it anew
            self.pending = None if pending is None else Batch.from_state(tensors["data"], pending)


def rl(model, tokenizer, cfg: RLConfig, out: str | Path, eval_cfg: EvalConfig | None = None) -> list[dict]:
    """Train `model` in place with RL; metrics and checkpoints go to `out`."""
    trainer = RLTrainer(model, tokenizer, cfg)
    return train_loop(trainer, out, cfg.resilience, cfg.steps, "rl",
                      after_step=lambda row: trainer.evaluate_every(row, eval_cfg))
