"""Questions in, scored completions out: the one prompt -> sample -> decode -> reward path that RL
rollouts, `keel eval` and `keel label` share.

Each question is rendered through the model's chat template, repeated `k` times (a question's
samples sit next to each other, as GRPO's groups and label's votes expect), sampled by
`engine.sampler.generate` in chunks of `batch_size` rows, decoded, and, when a reward is given, scored.
The serving engine (engine/batching.py) runs the same sampler on token ids that arrive one request
at a time; given a backend instead of a torch model (RL rollouts on ONNX Runtime), `complete`
samples through that engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from keel.errors import KeelError
from keel.models import render_prompt, special_ids
from keel.engine import batching
from keel.engine.sampler import Rollout, SamplingParams, generate

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
    """`k` completions of each question. `model` is a torch model, or a backend
    (`keel.engine.backends`) sampled through the batching engine. `generator` drives the sampling
    (one stream across chunks; for a backend, each chunk's seed is drawn from it); `advance(n)` is
    called after each chunk of n rows (a progress bar). `eos_id` replaces the tokenizer's end of
    sequence (-1: none, every sample runs the whole budget)."""
    eos, pad = special_ids(tokenizer)
    eos = eos if eos_id is None else eos_id
    prompts = [render_prompt(tokenizer, q) for q in questions for _ in range(k)]
    step = batch_size or max(1, len(prompts))
    tokens, logprobs, finished = [], [], []
    for start in range(0, len(prompts), step):
        chunk = prompts[start:start + step]
        if isinstance(model, torch.nn.Module):
            out = generate(model, chunk, params, eos_id=eos, pad_id=pad, generator=generator, compile=compile)
        else:
            out = _generate_on_backend(model, chunk, params, eos, generator)
        tokens += out.tokens
        logprobs += out.logprobs
        finished += out.finished
        if advance:
            advance(len(chunk))
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    scores = [reward(text, i // k) for i, text in enumerate(texts)] if reward else None
    return Completions(prompts, tokens, logprobs, finished, texts, scores)


def _generate_on_backend(backend, prompts: list[list[int]], params: SamplingParams, eos_id: int,
                         generator: torch.Generator | None) -> Rollout:
    """`prompts` completed by the batching engine over `backend`, all rows in one batch, as a Rollout."""
    seed = 0 if generator is None else int(torch.randint(2**31 - 1, (1,), generator=generator,
                                                         device=generator.device))
    if hasattr(backend, "generate"):  # a sampler that runs its own engine (keel.engine.vllm_backend)
        return backend.generate(prompts, params, eos_id=eos_id, seed=seed)
    reqs = batching.generate(backend, prompts, params, eos_id=eos_id, seed=seed, max_batch=len(prompts))
    failed = [r.error for r in reqs if r.finish_reason == "error"]
    if failed:
        raise KeelError(f"{len(failed)} of {len(reqs)} samples failed on the {backend.name} backend: {failed[0]}")
    return Rollout([r.tokens for r in reqs], [r.logprobs for r in reqs], [r.finish_reason == "stop" for r in reqs])
