"""Integer arithmetic: "352+479" -> "831", with compact worked traces for a character-level model.

Operands: a digit count k is drawn uniformly from 1..digits, then a k-digit number uniformly (k = 1
includes 0). For `*` the second operand has at most 2 digits. `-` may give negative results.

Traces (every character is a token, so they are short and mechanical; digits right to left):
  +  column addition, missing digits as 0, carry written as "+1":
     352+479 -> <think>2+9=11,5+7+1=13,3+4+1=8</think><answer>831</answer>
     The answer is the last column's sum followed by the units digit of each earlier column.
  -  column subtraction of the larger minus the smaller; a borrow shows as "1x" on the top digit and
     "-1" on the next column; a negative result starts with "-(b-a)," and the answer gets a minus:
     352-179 -> <think>12-9=3,15-7-1=7,3-1-1=1</think><answer>173</answer>
     179-352 -> <think>-(352-179),12-9=3,15-7-1=7,3-1-1=1</think><answer>-173</answer>
  *  one partial product per digit of the second operand (units first), then their sum:
     352*47 -> <think>352*7=2464,352*40=14080,2464+14080=16544</think><answer>16544</answer>
     352*7  -> <think>352*7=2464</think><answer>2464</answer>
"""

from __future__ import annotations

import random

from keel.errors import KeelError
from keel.tasks.base import (
    Example,
    check_n,
    check_split,
    int_option,
    numeric_reward,
    sample_distinct,
    split_rng,
)

OPS = "+-*"


def add_steps(a: int, b: int) -> list[str]:
    """Column addition of non-negative a and b, right to left."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={s}")
        carry = s // 10
    return steps


def sub_steps(a: int, b: int) -> list[str]:
    """Column subtraction a-b for a >= b >= 0, right to left, with borrows."""
    assert a >= b >= 0
    da, db = str(a)[::-1], str(b)[::-1]
    steps, borrow = [], 0
    for i in range(len(da)):
        x = int(da[i])
        y = int(db[i]) if i < len(db) else 0
        need = x - borrow < y
        top = x + 10 if need else x
        d = top - y - borrow
        steps.append(f"{top}-{y}" + ("-1" if borrow else "") + f"={d}")
        borrow = int(need)
    assert borrow == 0
    return steps


def mul_steps(a: int, b: int) -> list[str]:
    """Partial products of a with each digit of b (units first, shifted), then their sum."""
    digits = str(b)[::-1]
    partials = [a * int(d) * 10**i for i, d in enumerate(digits)]
    steps = [f"{a}*{int(d) * 10**i}={p}" for i, (d, p) in enumerate(zip(digits, partials))]
    if len(partials) > 1:
        steps.append("+".join(map(str, partials)) + f"={sum(partials)}")
    return steps


def solve(a: int, op: str, b: int) -> tuple[int, str]:
    """(exact result, think text) for `a op b`."""
    if op == "+":
        return a + b, ",".join(add_steps(a, b))
    if op == "-":
        if a >= b:
            return a - b, ",".join(sub_steps(a, b))
        return a - b, ",".join([f"-({b}-{a})"] + sub_steps(b, a))
    if op == "*":
        return a * b, ",".join(mul_steps(a, b))
    raise AssertionError(op)


class ArithmeticTask:
    """`digits`: most digits per operand (1..18). `ops`: any of "+-*", drawn uniformly per question."""

    name = "arithmetic"

    def __init__(self, digits: int = 3, ops: str = "+"):
        self.digits = int_option("digits", digits, 1, 18)
        if not isinstance(ops, str) or not ops or set(ops) - set(OPS):
            raise KeelError(f"task option ops={ops!r} must be a non-empty string of {OPS!r}, e.g. ops='+-'")
        self.ops = "".join(sorted(set(ops), key=OPS.index))

    def _operand(self, rng: random.Random, digits: int) -> int:
        k = rng.randint(1, digits)
        return rng.randint(0 if k == 1 else 10 ** (k - 1), 10**k - 1)

    def make(self, rng: random.Random) -> Example:
        op = rng.choice(self.ops)
        a = self._operand(rng, self.digits)
        b = self._operand(rng, min(self.digits, 2) if op == "*" else self.digits)
        result, think = solve(a, op, b)
        return Example(
            question=f"{a}{op}{b}",
            answer=str(result),
            trace=f"<think>{think}</think><answer>{result}</answer>",
        )

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        check_split(split)
        check_n(n)
        space = sum(10**self.digits * 10 ** (min(self.digits, 2) if op == "*" else self.digits) for op in self.ops)
        rng = split_rng(f"{self.name}:{self.digits}:{self.ops}", split, seed)
        return sample_distinct(self.make, split, n, rng, space, "ask for fewer examples or raise digits")

    def reward(self, completion: str, example: Example) -> dict[str, float]:
        return numeric_reward(completion, example)
