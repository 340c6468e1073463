"""keel's verifier against plain math-verify: accuracy per category on the hand-labelled set, and
per-check latency.

Data: tests/data/math_answers.jsonl ({"category", "reference", "completion", "correct"}, truth by
hand). keel = answers_match(extract_answer(completion), reference), math-verify running in keel's
worker process under a deadline; plain math-verify = verify(parse(reference), parse(completion)) in
this process with its own (signal.alarm) timeouts, as TRL's accuracy reward calls it.

Latency, per check, medians over the set (and p90): keel uncached (cache cleared before each check),
keel cached (the same checks again: repeated answers in a GRPO group), keel on the rows its exact
checks decide without the worker, and plain math-verify. Also the worker's start-up time. Prints a
table and, last, one JSON line.

    .venv/bin/python benchmarks/verify_vs_math_verify.py
"""

import json
import logging
import statistics
import time
from collections import defaultdict
from pathlib import Path

import math_verify

from keel.tasks import latex_answers
from keel.tasks.verify import answers_match, extract_answer

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "math_answers.jsonl"


def keel_says(row: dict) -> bool:
    return answers_match(extract_answer(row["completion"]), row["reference"])


def math_verify_says(row: dict) -> bool:
    try:
        ref = row["reference"]
        gold = math_verify.parse(f"${ref}$") or math_verify.parse(ref)
        return bool(math_verify.verify(gold, math_verify.parse(row["completion"])))
    except Exception:
        return False


def timed(fn, row) -> tuple[bool, float]:
    t = time.perf_counter()
    out = fn(row)
    return out, time.perf_counter() - t


def quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median_ms": 1000 * statistics.median(xs), "p90_ms": 1000 * xs[int(0.9 * (len(xs) - 1))],
            "max_ms": 1000 * xs[-1]}


def main() -> dict:
    logging.disable(logging.WARNING)  # math-verify logs a warning per timeout-disabled call
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]

    t = time.perf_counter()
    latex_answers.shutdown()
    latex_answers.warm_up()
    startup_s = time.perf_counter() - t

    hits = defaultdict(lambda: [0, 0, 0])
    keel_cold, keel_warm, keel_fast, mv_times = [], [], [], []
    for row in rows:
        latex_answers.clear_cache()
        asked = latex_answers.stats()["checks"]
        k, dt = timed(keel_says, row)
        keel_cold.append(dt)
        if latex_answers.stats()["checks"] == asked:
            keel_fast.append(dt)  # decided by keel's own checks, no worker round trip
        keel_warm.append(timed(keel_says, row)[1])
        m, dt = timed(math_verify_says, row)
        mv_times.append(dt)
        for cat in (row["category"], "ALL"):
            hits[cat][0] += 1
            hits[cat][1] += k == row["correct"]
            hits[cat][2] += m == row["correct"]

    table = {c: {"n": n, "keel": k / n, "math_verify": m / n} for c, (n, k, m) in sorted(hits.items())}
    result = {
        "rows": len(rows),
        "accuracy": table,
        "keel_not_worse_everywhere": all(r["keel"] >= r["math_verify"] for r in table.values()),
        "latency": {
            "keel_uncached": quantiles(keel_cold),
            "keel_cached": quantiles(keel_warm),
            "keel_no_worker": quantiles(keel_fast) | {"share_of_rows": len(keel_fast) / len(rows)},
            "math_verify_in_process": quantiles(mv_times),
        },
        "worker_startup_s": startup_s,
        "worker_stats": latex_answers.stats(),
    }

    print(f"{'category':24} {'n':>4} {'keel':>7} {'math-verify':>12}")
    for cat, r in table.items():
        print(f"{cat:24} {r['n']:>4} {r['keel']:>7.1%} {r['math_verify']:>12.1%}")
    print()
    print(f"{'per check':28} {'median ms':>10} {'p90 ms':>8} {'max ms':>8}")
    for name, q in result["latency"].items():
        print(f"{name:28} {q['median_ms']:>10.2f} {q['p90_ms']:>8.2f} {q['max_ms']:>8.2f}")
    print(f"worker start-up: {startup_s:.2f} s (once per process, and after a timeout, in the background)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
