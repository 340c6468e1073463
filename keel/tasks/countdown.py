"""Countdown: combine the given numbers with + - * / and parentheses to hit the target.

Question format: the numbers in ascending order, space separated, then " -> " and the target,
e.g. "3 7 9 -> 30". Sorting makes permutations of one puzzle the same question, so they dedupe and
land in the same split. Every number must be used exactly once.

Generation only produces solvable puzzles: a brute-force solver over all ways to combine the numbers
(non-negative integer intermediates, exact division only, so traces stay clean) lists reachable
targets in [1, max_target] and one is drawn. The reward accepts any expression that uses exactly the
given numbers and equals the target in exact Fraction arithmetic (fractional intermediates allowed).

Trace: one step per operation, innermost first, consistent with the answer expression:
  "3 7 9 -> 6" -> <think>9-7=2,2*3=6</think><answer>(9-7)*3</answer>
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from fractions import Fraction
from math import comb

from keel.errors import KeelError
from keel.tasks.base import (
    Example,
    check_n,
    check_split,
    int_option,
    sample_distinct,
    split_rng,
)
from keel.tasks.verify import extract_answer, format_reward

MAX_EXPR_CHARS = 200  # longer answers are not parsed
MAX_LITERAL = 10**6  # larger number literals are rejected before any arithmetic

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}

# An expression tree: an int leaf, or (op, left, right).


def _render(tree) -> str:
    """Infix text with only the parentheses precedence needs."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    ls, rs = _render(left), _render(right)
    if not isinstance(left, int) and _PREC[left[0]] < _PREC[op]:
        ls = f"({ls})"
    if not isinstance(right, int) and _PREC[right[0]] <= _PREC[op]:
        rs = f"({rs})"  # also a+(b-c): the text then reads in the same order as the trace steps
    return f"{ls}{op}{rs}"


def _steps(tree, out: list[str]) -> int:
    """Append "a op b = v" for each operation (post-order) and return the tree's value."""
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    a, b = _steps(left, out), _steps(right, out)
    v = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
    out.append(f"{a}{op}{b}={v}")
    return v


def solve_all(numbers: list[int]) -> dict[int, object]:
    """Every value reachable using ALL of `numbers` once, with non-negative integer intermediates,
    mapped to one expression tree that reaches it. Subset DP over bitmasks."""
    n = len(numbers)
    table: dict[int, dict[int, object]] = {1 << i: {x: x} for i, x in enumerate(numbers)}
    for mask in range(1, 1 << n):
        if mask in table:
            continue
        values: dict[int, object] = {}
        sub = (mask - 1) & mask
        while sub:
            rest = mask ^ sub
            if sub < rest:  # each unordered split once; both operand orders are tried below
                for a, ta in table[sub].items():
                    for b, tb in table[rest].items():
                        for x, y, tx, ty in ((a, b, ta, tb), (b, a, tb, ta)):
                            values.setdefault(x + y, ("+", tx, ty))
                            values.setdefault(x * y, ("*", tx, ty))
                            if x >= y:
                                values.setdefault(x - y, ("-", tx, ty))
                            if y and x % y == 0:
                                values.setdefault(x // y, ("/", tx, ty))
            sub = (sub - 1) & mask
        table[mask] = values
    return table[(1 << n) - 1]


def _eval(node, used: list[int]) -> Fraction:
    """Exact value of a whitelisted AST node; records number literals in `used`. Raises on anything
    else (callers catch)."""
    if isinstance(node, ast.Expression):
        return _eval(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if node.value > MAX_LITERAL:
            raise ValueError("literal too large")
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
        a, b = _eval(node.left, used), _eval(node.right, used)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        return a / b  # ZeroDivisionError is caught by the caller
    raise ValueError(f"not allowed: {type(node).__name__}")


def check_expression(expr: str | None, numbers: list[int], target: int) -> bool:
    """True iff `expr` uses exactly the multiset `numbers` with + - * / and parentheses (no unary
    minus, no other syntax) and equals `target`. A trailing "= ..." is ignored, and × ÷ are read as
    * /. Never raises; Python's parser is only given short, pre-checked text."""
    try:
        if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
            return False
        expr = expr.split("=", 1)[0].replace("×", "*").replace("÷", "/").strip()
        if not expr or set(expr) - set("0123456789+-*/() "):
            return False
        used: list[int] = []
        value = _eval(ast.parse(expr, mode="eval"), used)
        return Counter(used) == Counter(numbers) and value == target
    except Exception:  # SyntaxError, ZeroDivisionError, RecursionError, MemoryError, ValueError
        return False


class CountdownTask:
    """`count` numbers (2..6) drawn from 1..max_number (repeats allowed), target in 1..max_target."""

    name = "countdown"

    def __init__(self, count: int = 3, max_number: int = 20, max_target: int = 100):
        self.count = int_option("count", count, 2, 6)
        self.max_number = int_option("max_number", max_number, 1, 1000)
        self.max_target = int_option("max_target", max_target, 1, 100_000)

    def make(self, rng: random.Random) -> Example:
        for _ in range(1000):
            numbers = sorted(rng.randint(1, self.max_number) for _ in range(self.count))
            reachable = solve_all(numbers)
            targets = sorted(t for t in reachable if 1 <= t <= self.max_target)
            if targets:
                break
        else:  # only when max_target is below every reachable value
            raise KeelError(
                f"no countdown puzzle with a target <= {self.max_target} found; raise max_target"
            )
        target = rng.choice(targets)
        tree = reachable[target]
        steps: list[str] = []
        _steps(tree, steps)
        expr = _render(tree)
        return Example(
            question=" ".join(map(str, numbers)) + f" -> {target}",
            answer=expr,
            trace=f"<think>{','.join(steps)}</think><answer>{expr}</answer>",
            meta={"numbers": numbers, "target": target},
        )

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        check_split(split)
        check_n(n)
        # Upper bound on distinct puzzles: multisets of numbers times targets.
        space = comb(self.max_number + self.count - 1, self.count) * self.max_target
        rng = split_rng(f"{self.name}:{self.count}:{self.max_number}:{self.max_target}", split, seed)
        fix = "ask for fewer examples or raise max_number, max_target or count"
        return sample_distinct(self.make, split, n, rng, space, fix)

    def reward(self, completion: str, example: Example) -> dict[str, float]:
        """{"format": R1 format, "correct": the extracted expression solves the puzzle}."""
        try:
            meta = example.meta
            correct = check_expression(extract_answer(completion), list(meta["numbers"]), meta["target"])
        except Exception:
            correct = False
        return {"format": format_reward(completion), "correct": float(correct)}
