"""Questions in, scored completions out: the one prompt -> sample -> decode -> reward path that RL
rollouts, `keel eval` and `keel label` share.

Each question is rendered through the model's chat template, repeated `k` times (a question's
samples sit next to each other, as GRPO's groups and label's votes expect), sampled by `generate`
in chunks of `batch_size` rows, decoded, and, when a reward is given, scored.

There is one sampling engine: `keel.engine.batching.Engine`, the one `keel serve` and `keel
parity` run. `generate` runs it over a backend (a torch model is viewed as a `TorchBackend` where
it is, uncopied), every row sampling from the one generator given, so each decode step of a batch
is one `sample_next` call and a seed gives the same rollouts. A sampler with its own engine (vLLM:
keel.engine.vllm_backend) samples itself.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from keel.errors import KeelError
from keel.models import render_prompt, special_ids
from keel.engine import batching
from keel.engine.backends import TorchBackend
from keel.engine.sampler import Rollout, SamplingParams

Reward = Callable[[str, int], dict]  # (completion text, question index) -> {"correct", "format", ...}


@dataclass
class Completions:
    """One entry per sample, question-major: sample j of question i is entry i * k + j."""
    prompts: list[list[int]]     # prompt ids
    tokens: list[list[int]]      # completion ids, EOS included when produced
    logprobs: list[list[float]]  # per completion token, under the sampling policy
    finished: list[bool]         # EOS within the budget
    texts: list[str]             # decoded completions, special tokens dropped
    scores: list[dict] | None    # reward(text, question index) per sample, when a reward was given

    def mean_logprobs(self) -> list[float]:
        """Each completion's mean token log-prob (how sure the model was of it)."""
        return [sum(lp) / max(1, len(lp)) for lp in self.logprobs]


def complete(model, tokenizer, questions: list[str], params: SamplingParams, *, k: int = 1,
             generator: torch.Generator | None = None, reward: Reward | None = None,
             batch_size: int | None = None, compile: bool = False, eos_id: int | None = None,
             advance: Callable[[int], None] | None = None) -> Completions:
    """`k` completions of each question. `model` is a torch model, a backend
    (`keel.engine.backends`) or a sampler with its own engine (see `generate`). `generator` drives
    the sampling (one stream across chunks; a sampler with its own engine draws each chunk's seed
    from it); `advance(n)` is called after each chunk of n rows (a progress bar). `compile`: a
    torch model's decode steps run through torch.compile (`TorchBackend.of`). `eos_id` replaces
    the tokenizer's end of sequence (-1: none, every sample runs the whole budget)."""
    eos, _ = special_ids(tokenizer)
    eos = eos if eos_id is None else eos_id
    prompts = [render_prompt(tokenizer, q) for q in questions for _ in range(k)]
    step = batch_size or max(1, len(prompts))
    tokens, logprobs, finished = [], [], []
    for start in range(0, len(prompts), step):
        chunk = prompts[start:start + step]
        out = generate(model, chunk, params, eos_id=eos, generator=generator, compile=compile)
        tokens += out.tokens
        logprobs += out.logprobs
        finished += out.finished
        if advance:
            advance(len(chunk))
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    scores = [reward(text, i // k) for i, text in enumerate(texts)] if reward else None
    return Completions(prompts, tokens, logprobs, finished, texts, scores)


def generate(model, prompts: list[list[int]], params: SamplingParams, *, eos_id: int,
             generator: torch.Generator | None = None, stop_ids: Collection[int] = (),
             compile: bool = False) -> Rollout:
    """One completion of each prompt (token ids), all in one batch of the engine. `model`: a torch
    model (sampled where it is and as it is, in eval mode, its own mode restored after), a backend,
    or a sampler with its own engine (one with `generate`: vLLM, which gets a seed drawn from
    `generator`). Every row samples from `generator`, on the sampler's device (unused when greedy)."""
    if not prompts:
        raise KeelError("generate() got no prompts; pass at least one list of token ids")
    if has_own_engine(model):
        seed = 0 if generator is None else int(torch.randint(2**31 - 1, (1,), generator=generator,
                                                             device=generator.device))
        return model.generate(prompts, params, eos_id=eos_id, seed=seed, stop_ids=stop_ids)
    if not isinstance(model, torch.nn.Module):
        return _on_engine(model, prompts, params, eos_id, generator, stop_ids)
    was_training = model.training
    try:
        return _on_engine(TorchBackend.of(model, compile=compile), prompts, params, eos_id, generator, stop_ids)
    finally:
        model.train(was_training)


def has_own_engine(sampler) -> bool:
    """A sampler that generates itself (vLLM: keel.engine.vllm_backend), not a torch model or a
    backend stepped by keel's engine."""
    return hasattr(sampler, "generate") and not isinstance(sampler, torch.nn.Module)


def _on_engine(backend, prompts, params, eos_id, generator, stop_ids) -> Rollout:
    reqs = batching.generate(backend, prompts, params, eos_id=eos_id, stop_ids=stop_ids, max_batch=len(prompts),
                             generator=generator)
    failed = [r.error for r in reqs if r.finish_reason == "error"]
    if failed:
        raise KeelError(f"{len(failed)} of {len(reqs)} samples failed on the {backend.name} backend: {failed[0]}")
    return Rollout([r.tokens for r in reqs], [r.logprobs for r in reqs], [r.finish_reason == "stop" for r in reqs])
