"""pass@1 (greedy) and pass@k (sampled) on a task's test split, which training never sees."""

from __future__ import annotations

import torch

from keel.completions import complete
from keel.config import EvalConfig
from keel.device import make_generator
from keel.errors import KeelError
from keel.engine.sampler import SamplingParams
from keel.runlog import progress
from keel.tasks import get_task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from n samples of which c are correct (Chen et al. 2021).

    pass@k = 1 - C(n-c, k) / C(n, k), evaluated as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never
    forms the huge binomial coefficients.
    """
    if not 1 <= k <= n:
        raise KeelError(f"pass@k needs 1 <= k <= n samples, got k={k}, n={n}; sample at least k completions")
    assert 0 <= c <= n, f"correct count {c} outside [0, {n}]"
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    p_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        p_all_wrong *= 1.0 - k / i
    return 1.0 - p_all_wrong


@torch.no_grad()
def evaluate(model, tokenizer, cfg: EvalConfig, task=None, samples: bool = True) -> dict:
    """Score `model` on `cfg.n` test problems. Greedy decoding gives pass@1; `cfg.k` samples per
    problem at `cfg.temperature` give pass@k (unbiased estimator, n = k samples)."""
    task = task or get_task(cfg.task, **cfg.task_options)
    examples = task.examples("test", cfg.n, seed=cfg.seed)
    questions = [ex.question for ex in examples]
    reward = lambda text, i: task.reward(text, examples[i])
    generator = make_generator(next(model.parameters()).device, cfg.seed)
    total = len(questions) * (1 + (cfg.k if samples else 0))
    with progress("eval", total) as advance:
        greedy = complete(model, tokenizer, questions, SamplingParams(0.0, 1.0, cfg.max_new_tokens),
                          generator=generator, reward=reward, batch_size=cfg.batch_size, advance=advance)
        result = {"n": len(examples),
                  "pass@1": sum(r["correct"] for r in greedy.scores) / len(examples),
                  "format": sum(r["format"] for r in greedy.scores) / len(examples)}
        if samples:
            sampled = complete(model, tokenizer, questions, SamplingParams(cfg.temperature, 1.0, cfg.max_new_tokens),
                               k=cfg.k, generator=generator, reward=reward, batch_size=cfg.batch_size,
                               advance=advance)
            correct = [r["correct"] for r in sampled.scores]
            per_problem = [int(sum(correct[i * cfg.k:(i + 1) * cfg.k])) for i in range(len(examples))]
            result[f"pass@{cfg.k}"] = sum(pass_at_k(cfg.k, c, cfg.k) for c in per_problem) / len(examples)
            result["sampled_accuracy"] = sum(correct) / len(correct)
    result["examples"] = [{"question": ex.question, "answer": ex.answer, "output": out}
                          for ex, out in list(zip(examples, greedy.texts))[:5]]
    return result
