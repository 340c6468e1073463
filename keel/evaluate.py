"""pass@1 (greedy) and pass@k (sampled) on a task's test split, which training never sees."""

from __future__ import annotations

import torch

from keel.config import EvalConfig
from keel.device import make_generator
from keel.models import render_prompt, special_ids
from keel.rl.advantages import pass_at_k
from keel.rollout import SamplingParams, generate
from keel.runlog import progress
from keel.tasks import get_task


def _complete(model, tokenizer, prompts, params, batch_size, generator, advance):
    eos, pad = special_ids(tokenizer)
    texts = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        out = generate(model, chunk, params, eos_id=eos, pad_id=pad, generator=generator)
        texts += [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
        advance(len(chunk))
    return texts


@torch.no_grad()
def evaluate(model, tokenizer, cfg: EvalConfig, task=None, samples: bool = True) -> dict:
    """Score `model` on `cfg.n` test problems. Greedy decoding gives pass@1; `cfg.k` samples per
    problem at `cfg.temperature` give pass@k (unbiased estimator, n = k samples)."""
    task = task or get_task(cfg.task, **cfg.task_options)
    examples = task.examples("test", cfg.n, seed=cfg.seed)
    prompts = [render_prompt(tokenizer, ex.question) for ex in examples]
    device = next(model.parameters()).device
    generator = make_generator(device, cfg.seed)
    total = len(prompts) * (1 + (cfg.k if samples else 0))
    with progress("eval", total) as advance:
        greedy = _complete(model, tokenizer, prompts, SamplingParams(0.0, 1.0, cfg.max_new_tokens),
                           cfg.batch_size, generator, advance)
        rewards = [task.reward(text, ex) for text, ex in zip(greedy, examples)]
        result = {"n": len(examples),
                  "pass@1": sum(r["correct"] for r in rewards) / len(examples),
                  "format": sum(r["format"] for r in rewards) / len(examples)}
        if samples:
            repeated = [p for p in prompts for _ in range(cfg.k)]
            sampled = _complete(model, tokenizer, repeated, SamplingParams(cfg.temperature, 1.0, cfg.max_new_tokens),
                                cfg.batch_size, generator, advance)
            correct = [task.reward(text, examples[i // cfg.k])["correct"] for i, text in enumerate(sampled)]
            per_problem = [int(sum(correct[i * cfg.k:(i + 1) * cfg.k])) for i in range(len(examples))]
            result[f"pass@{cfg.k}"] = sum(pass_at_k(cfg.k, c, cfg.k) for c in per_problem) / len(examples)
            result["sampled_accuracy"] = sum(correct) / len(correct)
    result["examples"] = [{"question": ex.question, "answer": ex.answer, "output": out}
                          for ex, out in list(zip(examples, greedy))[:5]]
    return result
