"""Built-in and file tasks: correct traces, disjoint deterministic splits, rewards, user errors."""

import json
import re
from fractions import Fraction

import pytest

from keel.errors import KeelError
from keel.tasks import Example, Task, get_task
from keel.tasks.arithmetic import ArithmeticTask, solve
from keel.tasks.base import is_test
from keel.tasks.countdown import CountdownTask, check_expression, solve_all
from keel.tasks.files import FileTask
from keel.tasks.verify import format_reward

TRACE = re.compile(r"<think>(.*)</think><answer>(.*)</answer>")


def calc(expr: str) -> int:
    """Evaluate a trace's integer arithmetic (our own output, checked to be digits and + - *)."""
    assert re.fullmatch(r"[0-9+\-*]+", expr), expr
    return eval(expr)  # noqa: S307 - trusted, whitelisted test data


def split_trace(trace: str) -> tuple[list[str], str]:
    m = TRACE.fullmatch(trace)
    assert m, trace
    return m.group(1).split(","), m.group(2)


def test_example_to_row():
    ex = Example("3 7 -> 10", "3+7", "<think>3+7=10</think><answer>3+7</answer>", {"numbers": [3, 7], "target": 10})
    assert ex.to_row() == {"question": "3 7 -> 10", "answer": "3+7", "trace": ex.trace, "numbers": [3, 7], "target": 10}
    assert Example("1+1", "2").to_row() == {"question": "1+1", "answer": "2"}


# ---- arithmetic ---------------------------------------------------------------------------------


def test_arithmetic_traces_match_hand_worked_examples():
    assert solve(352, "+", 479) == (831, "2+9=11,5+7+1=13,3+4+1=8")
    assert solve(52, "+", 479) == (531, "2+9=11,5+7+1=13,0+4+1=5")
    assert solve(999, "+", 1) == (1000, "9+1=10,9+0+1=10,9+0+1=10")
    assert solve(352, "-", 179) == (173, "12-9=3,15-7-1=7,3-1-1=1")
    assert solve(179, "-", 352) == (-173, "-(352-179),12-9=3,15-7-1=7,3-1-1=1")
    assert solve(7, "-", 7) == (0, "7-7=0")
    assert solve(352, "*", 47) == (16544, "352*7=2464,352*40=14080,2464+14080=16544")
    assert solve(352, "*", 7) == (2464, "352*7=2464")
    assert solve(352, "*", 40) == (14080, "352*0=0,352*40=14080,0+14080=14080")


def check_arithmetic_trace(ex: Example):
    """Recompute every step and rebuild the answer from the steps alone."""
    a, op, b = re.fullmatch(r"([0-9]+)([+\-*])([0-9]+)", ex.question).groups()
    a, b = int(a), int(b)
    assert int(ex.answer) == calc(ex.question)
    steps, tagged = split_trace(ex.trace)
    assert tagged == ex.answer
    if op == "-" and a < b:
        assert steps[0] == f"-({b}-{a})"
        steps, a, b, sign = steps[1:], b, a, "-"
    else:
        sign = ""
    values = []
    for step in steps:
        lhs, rhs = step.split("=")
        assert calc(lhs) == int(rhs), step
        values.append(rhs)
    if op == "*":
        assert [s.split("=")[0] for s in steps[: len(str(b))]] == [
            f"{a}*{int(d) * 10**i}" for i, d in enumerate(reversed(str(b)))
        ]
        assert int(values[-1]) == a * b
    else:  # one step per column: the last full, the others contribute their units digit
        assert len(steps) == max(len(str(a)), len(str(b)))
        rebuilt = values[-1] + "".join(v[-1] for v in reversed(values[:-1]))
        assert sign + str(int(rebuilt)) == ex.answer


@pytest.mark.parametrize("digits, ops, n", [(3, "+", 300), (3, "-", 300), (3, "*", 300), (1, "+-*", 130), (6, "+-*", 300)])
def test_arithmetic_traces_are_correct(digits, ops, n):
    task = ArithmeticTask(digits=digits, ops=ops)
    exs = task.examples("train", n, seed=1)
    assert {ex.question for ex in exs} and len({ex.question for ex in exs}) == len(exs)
    for ex in exs:
        check_arithmetic_trace(ex)
        assert task.reward(ex.trace, ex) == {"format": 1.0, "correct": 1.0}
        wrong = ex.trace.replace(f"<answer>{ex.answer}</answer>", f"<answer>{int(ex.answer) + 1}</answer>")
        assert task.reward(wrong, ex) == {"format": 1.0, "correct": 0.0}


def test_arithmetic_operands_respect_digits_and_ops():
    exs = ArithmeticTask(digits=4, ops="+*").examples("train", 2000, seed=0)
    seen_ops = set()
    for ex in exs:
        a, op, b = re.fullmatch(r"([0-9]+)([+\-*])([0-9]+)", ex.question).groups()
        seen_ops.add(op)
        assert len(a) <= 4 and len(b) <= (2 if op == "*" else 4)
    assert seen_ops == {"+", "*"}


def test_arithmetic_addition_think_is_compact():
    assert len(solve(352, "+", 479)[1]) == 23
    thinks = [TRACE.fullmatch(ex.trace).group(1) for ex in ArithmeticTask(3).examples("train", 500)]
    assert max(len(t) for t in thinks) <= 45  # 3 columns with carries: "9+9=18,9+9+1=19,9+9+1=19"


def test_arithmetic_digits_knob_changes_lengths():
    def mean_len(digits):
        exs = ArithmeticTask(digits=digits).examples("train", 40, seed=0)
        return sum(len(ex.question) for ex in exs) / len(exs), max(len(ex.trace) for ex in exs)

    (q1, t1), (q3, t3), (q6, t6) = mean_len(1), mean_len(3), mean_len(6)
    assert q1 == 3.0  # "a+b" with one-digit operands
    assert q1 < q3 < q6 and t1 < t3 < t6


def test_arithmetic_splits_are_disjoint_and_deterministic():
    task = ArithmeticTask(digits=2, ops="+-*")
    train = task.examples("train", 4000, seed=0)
    test = task.examples("test", 400, seed=0)
    assert not {e.question for e in train} & {e.question for e in test}
    assert all(not is_test(e.question) for e in train) and all(is_test(e.question) for e in test)
    assert task.examples("test", 400, seed=0) == test
    assert ArithmeticTask(digits=2, ops="+-*").examples("train", 50, seed=0) == train[:50]
    assert task.examples("train", 50, seed=1) != train[:50]


def test_arithmetic_too_many_examples_is_a_user_error():
    with pytest.raises(KeelError, match="raise digits"):
        ArithmeticTask(digits=1).examples("test", 100)


@pytest.mark.parametrize("kwargs", [{"digits": 0}, {"digits": 19}, {"digits": 2.5}, {"ops": "/"}, {"ops": ""}])
def test_arithmetic_bad_options(kwargs):
    with pytest.raises(KeelError):
        ArithmeticTask(**kwargs)


@pytest.mark.parametrize("split, n", [("valid", 3), ("train", -1), ("train", 2.0)])
def test_bad_split_or_n(split, n):
    with pytest.raises(KeelError):
        ArithmeticTask().examples(split, n)


# ---- countdown ----------------------------------------------------------------------------------


def test_countdown_solver_hand_checked():
    assert set(solve_all([2, 2])) == {4, 0, 1}  # 2+2, 2*2, 2-2, 2/2
    assert set(solve_all([3, 5])) == {8, 15, 2}  # 5/3 is not an integer
    reach = solve_all([3, 7, 9])
    assert {30, 48, 1} <= set(reach) and 29 not in reach


def check_countdown_example(ex: Example, task: CountdownTask):
    numbers, target = ex.meta["numbers"], ex.meta["target"]
    assert ex.question == " ".join(map(str, numbers)) + f" -> {target}"
    assert numbers == sorted(numbers) and len(numbers) == task.count
    assert all(1 <= x <= task.max_number for x in numbers) and 1 <= target <= task.max_target
    assert check_expression(ex.answer, numbers, target)
    steps, tagged = split_trace(ex.trace)
    assert tagged == ex.answer and len(steps) == task.count - 1
    for step in steps:  # each step is exact and uses non-negative integers
        lhs, rhs = step.split("=")
        x, op, y = re.fullmatch(r"([0-9]+)([+\-*/])([0-9]+)", lhs).groups()
        exact = Fraction(calc(f"{x}{op}{y}")) if op != "/" else Fraction(int(x), int(y))
        assert exact == int(rhs) >= 0, step
    assert int(steps[-1].split("=")[1]) == target
    assert task.reward(ex.trace, ex) == {"format": 1.0, "correct": 1.0}


@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_countdown_solutions_verify(count):
    task = CountdownTask(count=count)
    for ex in task.examples("train", 200 if count < 5 else 40, seed=3):
        check_countdown_example(ex, task)


def test_countdown_hand_example():
    ex = Example("3 7 9 -> 6", "(9-7)*3", meta={"numbers": [3, 7, 9], "target": 6})
    task = CountdownTask()
    r = task.reward
    assert r("<think>9-7=2,2*3=6</think><answer>(9-7)*3</answer>", ex) == {"format": 1.0, "correct": 1.0}
    assert r("<answer>3*(9-7) = 6</answer>", ex) == {"format": 0.0, "correct": 1.0}
    assert r("<answer>(9−7)×3</answer>", ex)["correct"] == 0.0  # a unicode minus is not allowed
    assert r("<answer>(9-7)×3</answer>", ex)["correct"] == 1.0


@pytest.mark.parametrize(
    "expr",
    [
        "(9-7)*4",  # a number not given
        "(9-7)*3*3",  # reuse
        "9-7*3",  # evaluates to -12, not the target
        "9-7",  # leaves a number out
        "2**100**100",
        "(9-7)**3",
        "3/(7-7)*9",  # division by zero
        "-3+9",  # unary minus
        "(9-7)*3.0",  # float literal
        "(9-7)*abs(3)",
        "__import__('os').system('echo hi')",
        "1" * 300,
        "9" * 50 + "*0+" + "(9-7)*3",
        "(" * 150 + "3" + ")" * 150,
        "",
        None,
    ],
)
def test_countdown_bad_expressions_score_zero(expr, capfd):
    ex = Example("3 7 9 -> 6", "(9-7)*3", meta={"numbers": [3, 7, 9], "target": 6})
    assert check_expression(expr, [3, 7, 9], 6) is False
    completion = f"<think>x</think><answer>{expr}</answer>"
    assert CountdownTask().reward(completion, ex) == {"format": format_reward(completion), "correct": 0.0}
    assert "hi" not in capfd.readouterr().out


def test_countdown_fractional_intermediates_are_accepted():
    assert check_expression("(1+1/3)*3", [1, 1, 3, 3], 4)  # 4/3 * 3 = 4, exactly
    assert check_expression("7/2*2", [7, 2, 2], 7)


def test_countdown_splits_are_disjoint_and_deterministic():
    task = CountdownTask()
    train = task.examples("train", 3000, seed=0)
    test = task.examples("test", 300, seed=0)
    assert len({e.question for e in train}) == 3000
    assert not {e.question for e in train} & {e.question for e in test}
    assert CountdownTask().examples("test", 300, seed=0) == test
    assert task.examples("test", 300, seed=1) != test


def test_countdown_difficulty_knobs():
    small = CountdownTask(count=3, max_number=10, max_target=50).examples("train", 200)
    big = CountdownTask(count=4, max_number=50, max_target=500).examples("train", 200)
    assert max(e.meta["target"] for e in small) <= 50 < max(e.meta["target"] for e in big)
    assert sum(len(e.question) for e in small) < sum(len(e.question) for e in big)
    with pytest.raises(KeelError, match="fewer examples"):
        CountdownTask(count=2, max_number=3, max_target=5).examples("test", 50)


# ---- files --------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gsm_rows(n):
    return [{"question": f"Q{i}: what is {i}+{i}?", "answer": f"{i}+{i} = {2 * i}\n#### {2 * i:,}"} for i in range(n)]


def test_file_task_jsonl_gsm8k(tmp_path):
    task = FileTask(str(write_jsonl(tmp_path / "d.jsonl", gsm_rows(400))))
    train, test = task.examples("train", 300), task.examples("test", 20)
    assert not {e.question for e in train} & {e.question for e in test}
    ex = train[0]
    i = int(re.match(r"Q(\d+)", ex.question).group(1))
    assert ex.answer == f"{2 * i:,}"
    assert ex.trace == f"<think>{i}+{i} = {2 * i}</think><answer>{2 * i:,}</answer>"  # the working is the trace
    assert task.reward(f"<think>.</think><answer>{2 * i}</answer>", ex) == {"format": 1.0, "correct": 1.0}
    assert task.reward(f"so it is {2 * i + 1}", ex) == {"format": 0.0, "correct": 0.0}
    assert task.examples("train", 300) == train
    assert task.examples("train", 300, seed=1) != train
    n_test = sum(is_test(r["question"]) for r in gsm_rows(400))
    assert 10 < n_test < 80
    assert len(task.examples("test", n_test)) == n_test
    with pytest.raises(KeelError, match=f"at most {n_test}"):
        task.examples("test", n_test + 1)


def test_file_task_parquet_custom_keys_and_trace(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    qs = [f"{i}*2" for i in range(100)]
    pq.write_table(
        pa.table({"problem": qs, "solution": [str(2 * i) for i in range(100)],
                  "cot": [f"<think>x</think><answer>{2 * i}</answer>" for i in range(100)]}),
        path,
    )
    task = get_task(str(path), question_key="problem", answer_key="solution", trace_key="cot", test_fraction=0.5)
    train = task.examples("train", 30)
    assert all(e.trace == f"<think>x</think><answer>{e.answer}</answer>" for e in train)
    assert all(task.reward(e.trace, e)["correct"] == 1.0 for e in train)
    n_train = len(task._splits["train"])
    assert n_train + len(task._splits["test"]) == 100 and 25 < n_train < 75


def test_file_task_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1", "answer": "2"}])
    with pytest.raises(KeelError) as e:
        FileTask(str(path))
    msg = str(e.value)
    assert "d.jsonl" in msg and "'question'" in msg and "problem" in msg and "task option question_key" in msg


def test_file_task_missing_value_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "1"}, {"question": "b"}])
    with pytest.raises(KeelError, match="line 2.*'answer'"):
        FileTask(str(path))


def test_file_task_bad_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n\n{"question": "b", "answer": \n')
    with pytest.raises(KeelError, match="d.jsonl line 3"):
        FileTask(str(path))


@pytest.mark.parametrize("content", ["", "\n\n", "[1, 2]\n"])
def test_file_task_empty_or_not_objects(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(KeelError, match="d.jsonl"):
        FileTask(str(path))


def test_file_task_unreadable_files(tmp_path):
    with pytest.raises(KeelError, match="does not exist"):
        FileTask(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(KeelError, match="bad.parquet"):
        FileTask(str(bad))
    with pytest.raises(KeelError, match="test_fraction"):
        FileTask(str(write_jsonl(tmp_path / "d.jsonl", gsm_rows(3))), test_fraction=1.5)


# ---- get_task -----------------------------------------------------------------------------------


def test_get_task_builtins_and_options(tmp_path):
    task = get_task("arithmetic", digits="2", ops="-")  # digit strings as from a command line
    assert isinstance(task, ArithmeticTask) and task.digits == 2 and task.ops == "-"
    assert isinstance(task, Task) and isinstance(get_task("countdown", count=None), Task)
    assert get_task("countdown", count=None).count == 3  # None means the default
    assert isinstance(get_task(str(write_jsonl(tmp_path / "d.jsonl", gsm_rows(5)))), FileTask)


def test_get_task_unknown_name_lists_choices():
    with pytest.raises(KeelError, match="arithmetic, countdown"):
        get_task("gsm8k")


def test_get_task_unknown_option():
    with pytest.raises(KeelError, match="digits"):
        get_task("countdown", digits=3)
