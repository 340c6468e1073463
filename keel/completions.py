"""Questions in, scored completions out: the one prompt -> sample -> decode -> reward path that RL
rollouts, `keel eval` and `keel label` share.

Each question is rendered through the model's chat template, repeated `k` times (a question's
samples sit next to each other, as GRPO's groups and label's votes expect), sampled by
`engine.sampler.generate` in chunks of `batch_size` rows, decoded, and, when a reward is given, scored.
The serving engine (engine/batching.py) runs the same sampler on token ids that arrive one request
at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from keel.models import render_prompt, special_ids
from keel.engine.sampler import SamplingParams, generate

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
    """`k` completions of each question. `generator` drives the sampling (one stream across
    chunks); `advance(n)` is called after each chunk of n rows (a progress bar). `eos_id`
    replaces the tokenizer's end of sequence (-1: none, every sample runs the whole budget)."""
    eos, pad = special_ids(tokenizer)
    eos = eos if eos_id is None else eos_id
    prompts = [render_prompt(tokenizer, q) for q in questions for _ in range(k)]
    step = batch_size or max(1, len(prompts))
    tokens, logprobs, finished = [], [], []
    for start in range(0, len(prompts), step):
        chunk = prompts[start:start + step]
        out = generate(model, chunk, params, eos_id=eos, pad_id=pad, generator=generator, compile=compile)
        tokens += out.tokens
        logprobs += out.logprobs
        finished += out.finished
        if advance:
            advance(len(chunk))
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    scores = [reward(text, i // k) for i, text in enumerate(texts)] if reward else None
    return Completions(prompts, tokens, logprobs, finished, texts, scores)
