"""keel's verifier against plain math-verify on hand-labelled MATH-style reference/completion pairs.

tests/data/math_answers.jsonl: one row per pair, {"category", "reference", "completion", "correct"},
the truth written by hand. keel = `answers_match(extract_answer(completion), reference)`; plain
math-verify = `verify(parse(reference), parse(completion))` with its defaults, as TRL's accuracy
reward uses it. keel must be at least as accurate in every category. `pytest -s` prints the table.
"""

import json
from collections import defaultdict
from pathlib import Path

import math_verify  # a main dependency: this comparison must run, not be skipped, in CI
import pytest

from keel.tasks import latex_answers
from keel.tasks.verify import answers_match, extract_answer

DATA = Path(__file__).parent.parent / "data" / "math_answers.jsonl"
KEEL_OVERALL_BAR = 0.97  # keel's overall accuracy on the set must stay above this


def rows() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def keel_says(row: dict) -> bool:
    return answers_match(extract_answer(row["completion"]), row["reference"])


def math_verify_says(row: dict) -> bool:
    """Plain math-verify: the reference parsed in `$...$` (bare text if that finds nothing), the whole
    completion parsed with the default extraction, then verify(gold, pred)."""
    try:
        ref = row["reference"]
        gold = math_verify.parse(f"${ref}$") or math_verify.parse(ref)
        return bool(math_verify.verify(gold, math_verify.parse(row["completion"])))
    except Exception:
        return False


def accuracy_table(data: list[dict]) -> dict[str, dict[str, float]]:
    """{category: {"n", "keel", "math_verify"}} plus an "ALL" row; accuracies in [0, 1]."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for row in data:
        k, m = keel_says(row) == row["correct"], math_verify_says(row) == row["correct"]
        for cat in (row["category"], "ALL"):
            hits[cat][0] += 1
            hits[cat][1] += k
            hits[cat][2] += m
    return {c: {"n": n, "keel": k / n, "math_verify": m / n} for c, (n, k, m) in sorted(hits.items())}


def format_table(table: dict) -> str:
    lines = [f"{'category':24} {'n':>4} {'keel':>7} {'math-verify':>12}"]
    for cat, r in table.items():
        lines.append(f"{cat:24} {r['n']:>4} {r['keel']:>7.1%} {r['math_verify']:>12.1%}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def table():
    latex_answers.warm_up()
    return accuracy_table(rows())


def test_data_set_is_big_and_balanced():
    data = rows()
    assert len(data) >= 200
    by_cat = defaultdict(set)
    for row in data:
        assert set(row) == {"category", "reference", "completion", "correct"}
        assert isinstance(row["correct"], bool)
        by_cat[row["category"]].add(row["correct"])
    for cat, truths in by_cat.items():
        assert truths == {True, False}, f"{cat} needs right and wrong cases"


def test_keel_at_least_as_accurate_as_math_verify_everywhere(table):
    print("\n" + format_table(table))
    worse = [f"{c}: keel {r['keel']:.1%} < math-verify {r['math_verify']:.1%}"
             for c, r in table.items() if r["keel"] < r["math_verify"]]
    assert not worse, "\n".join(worse)
    assert table["ALL"]["keel"] >= KEEL_OVERALL_BAR


def test_keel_is_deterministic_on_the_set():
    data = rows()[::7]
    first = [keel_says(r) for r in data]
    latex_answers.shutdown()  # a fresh worker must give the same verdicts
    assert [keel_says(r) for r in data] == first
