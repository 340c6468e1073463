"""What a task is: examples with reference answers, and a reward that checks a completion.

Shared pieces live here too: the stable train/test split, seeded sampling of distinct questions
and the numeric reward. `tasks/registry.py` turns a name or a file path into a task.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

from keel.errors import KeelError
from keel.tasks.verify import answers_match, extract_answer, format_reward

SPLITS = ("train", "test")
TEST_FRACTION = 0.1  # share of the question space held out for the built-in tasks


@dataclass(frozen=True)
class Example:
    """One problem. `trace` is a full worked completion in R1 format for SFT:
    "<think>...</think><answer>...</answer>" (no EOS)."""

    question: str
    answer: str
    trace: str | None = None
    meta: dict = field(default_factory=dict)

    def to_row(self) -> dict:
        """One JSONL row: {"question", "answer", "trace" (if any), **meta}."""
        row = {"question": self.question, "answer": self.answer}
        if self.trace is not None:
            row["trace"] = self.trace
        row.update(self.meta)
        return row


@runtime_checkable
class Task(Protocol):
    name: str

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """n distinct examples of `split` ("train" or "test"), deterministic in (split, n, seed)."""
        ...

    def reward(self, completion: str, example: Example) -> dict[str, float]:
        """{"format": 0..1, "correct": 0 or 1}. Never raises, on any string."""
        ...


def is_test(question: str, test_fraction: float = TEST_FRACTION) -> bool:
    """Stable split membership: the question's sha256 decides, so a question is in the same split
    on every machine, run and Python version."""
    h = int.from_bytes(hashlib.sha256(question.encode("utf-8", "replace")).digest()[:8], "big")
    return h < test_fraction * 2**64


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise KeelError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def check_n(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise KeelError(f"number of examples must be a non-negative integer, got {n!r}")


def split_rng(name: str, split: str, seed: int) -> random.Random:
    """The generator for one (task, split, seed): string seeds hash deterministically (sha512)."""
    return random.Random(f"{name}:{split}:{seed}")


def sample_distinct(
    make: Callable[[random.Random], Example],
    split: str,
    n: int,
    rng: random.Random,
    space: float,
    fix: str,
) -> list[Example]:
    """Draw examples with `make(rng)` until n distinct questions of `split` are found.

    `space` estimates how many questions the whole task has; asking for more than half of a split's
    share would make rejection sampling crawl, so that raises KeelError with `fix` as the remedy."""
    share = space * (TEST_FRACTION if split == "test" else 1 - TEST_FRACTION)
    if n > share / 2:
        raise KeelError(
            f"asked for {n} {split} examples but these settings allow about {int(share / 2)}; {fix}"
        )
    want_test = split == "test"
    seen: set[str] = set()
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:
            raise KeelError(f"could not find {n} distinct {split} examples; {fix}")
        ex = make(rng)
        if ex.question in seen or is_test(ex.question) != want_test:
            continue
        seen.add(ex.question)
        out.append(ex)
    return out


def numeric_reward(completion: str, example: Example) -> dict[str, float]:
    """Reward for tasks whose answer is a number: R1 format, and the extracted answer matches."""
    try:
        correct = answers_match(extract_answer(completion), example.answer)
    except Exception:  # verify.py never raises; this keeps the promise if that ever changes
        correct = False
    return {"format": format_reward(completion), "correct": float(correct)}


def int_option(name: str, value, lo: int, hi: int) -> int:
    """An integer task option in [lo, hi]; digit strings (from a command line) are accepted."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise KeelError(f"task option {name}={value!r} must be an integer in [{lo}, {hi}]")
    return value
