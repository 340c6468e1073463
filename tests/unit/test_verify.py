"""Verifiers: answer extraction, answer matching and the format reward, on adversarial input."""

import random
import time
from fractions import Fraction

import pytest
import sympy.parsing.sympy_parser  # noqa: F401  (imported here so its one-off cost is not timed)

from keel.tasks.verify import answers_match, extract_answer, format_reward, parse_number


def timed(fn, *args, limit=1.0):
    t = time.perf_counter()
    out = fn(*args)
    assert time.perf_counter() - t < limit, f"{fn.__name__} too slow on {str(args)[:80]!r}"
    return out


# ---- extract_answer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>2+9=11</think><answer>831</answer>", "831"),
        ("<answer> 1 </answer> then <answer>2</answer>", "2"),
        ("<answer><answer>5</answer></answer>", "5"),  # nested: innermost of the last pair
        ("<answer>1</answer><answer>2", "1"),  # trailing unclosed tag is ignored
        ("<answer>7", "7"),  # unclosed only: falls back to the last number
        ("</answer>3<answer>", "3"),  # tags in the wrong order are not a pair
        ("<answer></answer>", ""),
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}} and more", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("\\boxed{unclosed 12", "12"),
        ("we get 1,234 apples.", "1,234"),
        ("x = -3", "-3"),
        ("18-56", "56"),  # a minus after a digit is subtraction, not a sign
        ("half is 3/4", "3/4"),
        ("pi is 3.14.", "3.14"),
        ("٨٣١", "831"),  # Arabic-Indic digits are normalised to ASCII
        ("answer: ３", "3"),  # fullwidth too
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("garbage", [None, 831, b"<answer>1</answer>", ["<answer>1</answer>"], object()])
def test_extract_answer_non_strings_give_none(garbage):
    assert extract_answer(garbage) is None


def test_extract_answer_huge_inputs_are_fast():
    digits = "7" * 1_000_000
    assert set(timed(extract_answer, digits)) == {"7"}
    assert timed(extract_answer, "<answer>" * 100_000) is None
    assert timed(extract_answer, "</answer>" * 100_000) is None
    assert timed(extract_answer, "<answer>1</answer>" * 100_000) == "1"
    assert timed(extract_answer, "\\boxed{" * 100_000) is None
    assert timed(extract_answer, "{" * 500_000 + "\\boxed{" + "{" * 500_000) is None
    assert timed(extract_answer, "1," * 500_000) == "1"


# ---- parse_number / answers_match ---------------------------------------------------------------


@pytest.mark.parametrize(
    "s, value",
    [
        ("72", Fraction(72)),
        (" -3 ", Fraction(-3)),
        ("- 3", Fraction(-3)),
        ("+4", Fraction(4)),
        ("0.5", Fraction(1, 2)),
        ("3 / 4", Fraction(3, 4)),
        ("$1,234.50", Fraction(246900, 200)),
        ("72.", Fraction(72)),
        (".25", Fraction(1, 4)),
        (5, Fraction(5)),
        ("1,23", None),  # not a thousands grouping
        ("3/0", None),
        ("1e3", None),
        ("abc", None),
        ("9" * 1000, None),  # too long to parse
        (None, None),
        (True, None),
    ],
)
def test_parse_number(s, value):
    assert parse_number(s) == value


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("1,234", "1234"),
        ("0.5", "1/2"),
        ("-3", "- 3"),
        ("$72", "72"),
        ("72.", "72"),
        ("72", "Natalia sold 48/2 = 24 clips in May. ... #### 72"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{3}{4}", "0.75"),
        ("2\\sqrt{3}", "sqrt(12)"),
        ("3x", "x*3"),
        ("2^{10}", "1024"),
        ("x+x", "2*x"),
        ("(x+1)^2", "x^2+2*x+1"),
        ("0.1+0.2", "0.3"),  # exact: decimals become rationals
        ("٨٣١", "831"),
        ("Paris", " paris "),  # last resort: normalised string equality
    ],
)
def test_answers_match_true(pred, ref):
    assert timed(answers_match, pred, ref)


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("832", "831"),
        ("1/3", "0.333"),
        ("-3", "3"),
        ("x-y", "y-x"),
        ("1,23", "123"),
        (None, "1"),
        ("", "0"),
        ("1", ""),
        ("3/0", "0"),
        ("1/(x-x)", "0"),
        ("(0." + "9" * 40 + "^-9)^-9", "1"),  # within float tolerance of 1, but exactly not 1
    ],
)
def test_answers_match_false(pred, ref):
    assert not timed(answers_match, pred, ref)


@pytest.mark.parametrize(
    "malicious",
    [
        "__import__('os').system('echo hi')",
        "__import__(\"os\").system(\"touch /tmp/keel_pwned\")",
        "exec('import os')",
        "x.n(10000000)",  # attribute access would reach a slow method
        "S('__import__(1)')",
        "lambda: 0",
        "2^9^9",  # chained power: 2^387420489
        "2**9**9",
        "(9^99)^99",
        "((x+1)^99)^99",
        "2**100**100",
        "y^z2^99",  # "z2" is one Python name: a chained power in disguise
        "sqrt(580554684743423186978810824041^99)",  # an exact root would try to factorise
        "3x*()",
        "E**(I*pi)",
        "9" * 150,
        "(" * 5000 + "1" + ")" * 5000,
    ],
)
def test_answers_match_refuses_unsafe_input_fast(malicious, capfd):
    assert timed(answers_match, malicious, "0") is False
    assert timed(answers_match, "0", malicious) is False
    out = capfd.readouterr()
    assert "hi" not in out.out


def test_answers_match_does_not_execute_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path('{marker}').touch()"
    assert answers_match(payload, "1") is False
    assert answers_match("1", payload) is False
    assert not marker.exists()


def test_answers_match_huge_inputs_are_fast():
    big = "7" * 1_000_000
    assert timed(answers_match, big, big)  # string equality still works, without parsing
    assert not timed(answers_match, big, "7")
    assert not timed(answers_match, "<answer>" * 100_000, "1")


# ---- format_reward ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, reward",
    [
        ("<think>2+9=11</think><answer>11</answer>", 1.0),
        ("  <think>x</think>\n<answer> 11 </answer>\n", 1.0),
        ("<think></think><answer>1</answer>", 1.0),  # an empty think is allowed
        ("<think>x</think><answer> </answer>", 0.0),  # blank answer
        ("<think>x</think><answer>1</answer>extra", 0.0),
        ("preamble<think>x</think><answer>1</answer>", 0.0),
        ("<think>x</think>words<answer>1</answer>", 0.0),
        ("<answer>1</answer><think>x</think>", 0.0),
        ("<think>x</think><answer>1</answer><answer>2</answer>", 0.0),
        ("<think><think>x</think></think><answer>1</answer>", 0.0),
        ("<think>x</think><answer>1", 0.0),
        ("<think>x<answer>1</answer>", 0.0),
        ("<answer>1</answer>", 0.0),
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_format_reward(text, reward):
    assert format_reward(text) == reward


def test_format_reward_huge_input_is_fast():
    assert timed(format_reward, "<think>" + "<answer>" * 100_000) == 0.0
    assert timed(format_reward, "<think>" + "x" * 1_000_000 + "</think><answer>1</answer>") == 1.0


# ---- fuzz ---------------------------------------------------------------------------------------


def test_fuzz_random_unicode_never_raises():
    from keel.tasks import latex_answers

    latex_answers.warm_up()  # its one-off start-up is not what the per-input bound is about
    rng = random.Random(0)
    pieces = ["<answer>", "</answer>", "<think>", "</think>", "\\boxed{", "{", "}", "\\frac", "####",
              "-", "/", ",", ".", "^", "**", "(", ")", "sqrt", "x", " ", "$", "٣", "３", "1", "9"]
    for i in range(400):
        n = rng.randint(0, 60)
        if i % 2:
            s = "".join(rng.choice(pieces) for _ in range(n))
        else:  # arbitrary code points, including surrogates and control characters
            s = "".join(chr(rng.randint(0, 0x10FFFF)) for _ in range(n))
        t0 = time.perf_counter()
        a = extract_answer(s)
        assert a is None or isinstance(a, str)
        assert format_reward(s) in (0.0, 1.0)
        assert isinstance(answers_match(a, s), bool)
        assert isinstance(answers_match(s, "12"), bool)
        p = parse_number(s)
        assert p is None or isinstance(p, Fraction)
        assert time.perf_counter() - t0 < 1.0, repr(s)


# ---- LaTeX answers through math-verify, hedges, prose --------------------------------------------

from keel.tasks import latex_answers  # noqa: E402


@pytest.mark.parametrize(
    "text, expected",
    [
        ("So the answer is 18 dollars. That took me 2 minutes.", "18"),  # not the last number
        ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("The answer is x = 3.", "x = 3"),
        ("The answer is 6 or 5.", "6 or 5"),  # kept whole, so answers_match can reject the hedge
        ("It is $\\boxed{6}$ or $\\boxed{5}$.", "6 or 5"),
        ("I first thought \\boxed{5} but it is \\boxed{6}, since 5 fails.", "6"),
        ("x = \u22127", "-7"),  # the last-number fallback reads a Unicode minus
        ("<answer>(9\u22127)*3</answer>", "(9\u22127)*3"),  # but tag contents keep it (countdown)
    ],
)
def test_extract_answer_final_answer_and_hedges(text, expected):
    assert timed(extract_answer, text) == expected


def test_extract_answer_prose_fallback_is_fast_on_huge_input():
    assert timed(extract_answer, "the answer is " * 200_000) is None
    assert timed(extract_answer, ("answer: " + "$" * 1000) * 100) is None
    assert timed(extract_answer, "answer is 1. " * 100_000) == "1"


@pytest.mark.parametrize(
    "pred, ref",
    [("6 or 5", "6"), ("6 or 5", "5"), ("either 3 or 4", "3"), ("6 \\text{ or } 5", "6"), ("3 \\lor 4", "3")],
)
def test_answers_match_rejects_hedges(pred, ref):
    assert not timed(answers_match, pred, ref)


def test_answers_match_hedge_allowed_when_the_reference_has_one():
    pytest.importorskip("math_verify")
    latex_answers.warm_up()
    assert timed(answers_match, "1 \\text{ or } 2", "1 \\text{ or } 2")


def test_answers_match_scientific_and_unicode_minus():
    assert answers_match("3e5", "300000")
    assert answers_match("1.5E-3", "0.0015")
    assert not answers_match("3e4", "300000")
    assert answers_match("\u22123", "-3")
    assert not answers_match("\u22123", "3")
    assert parse_number("\u22123") == -3
    assert parse_number("1e3") is None  # parse_number itself stays plain


def test_mixed_numbers_without_math_verify():
    assert answers_match("2\\frac{1}{2}", "2.5")  # 2 + 1/2, not 2 * 1/2
    assert not answers_match("2\\frac{1}{2}", "1")


@pytest.fixture
def worker():
    pytest.importorskip("math_verify")
    assert latex_answers.warm_up()
    return latex_answers


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("\\frac{1}{2}", "\\frac12"),
        ("\\frac12", "0.5"),
        ("\\sqrt{2}", "\\sqrt2"),
        ("10", "10\\text{ cm}"),
        ("30", "30^\\circ"),
        ("50", "50\\%"),
        ("x=3", "3"),
        ("\\{2,1\\}", "\\{1,2\\}"),
        ("[1,2)", "[1,2)"),
        ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
        ("\\frac52", "2\\frac{1}{2}"),
        ("2^{1/3}", "\\sqrt[3]{2}"),
        ("3", "\\log_2 8"),
        ("10", "\\binom{5}{2}"),
        ("3628800", "10!"),
        ("1267650600228229401496703205376", "2^{100}"),
    ],
)
def test_answers_match_latex_via_math_verify(worker, pred, ref):
    assert timed(answers_match, pred, ref)


@pytest.mark.parametrize(
    "pred, ref",
    [("\\frac{1}{3}", "\\frac12"), ("x=4", "3"), ("[1,2]", "[1,2)"), ("(-4,3)", "(3,-4)"),
     ("11", "10\\text{ cm}")],
)
def test_answers_match_latex_negatives(worker, pred, ref):
    assert not timed(answers_match, pred, ref)


@pytest.mark.parametrize(
    "malicious",
    [
        "2^9^9",
        "9^{9^{9}}",
        "2^{9}^{9}",
        "2^{10^{10}}",
        "x^{x^{x^{x}}}",
        "((x+1)^{30})^{30}",
        "(10^{10})!",
        "100000!",
        "10^{1000}",
        "\\binom{100000}{50000}",
        "\\sqrt{580554684743423186978810824041^{99}}",
        "\\frac{" * 500 + "1",
        "\\frac{1}{" * 60 + "2" + "}" * 60,
        "{" * 10_000,
        "\\left(" * 100 + "1" + "\\right)" * 100,
        "\\begin{pmatrix}" + "1&" * 300 + "1\\end{pmatrix}",
    ],
)
def test_pathological_latex_is_refused_before_math_verify(worker, malicious):
    before = worker.stats()["timeouts"]
    assert timed(answers_match, malicious, "0") is False
    assert timed(answers_match, "0", malicious) is False
    assert worker.stats()["timeouts"] == before  # refused up front: no worker had to be killed


def test_worker_deadline_kills_and_replaces(worker):
    before = worker.stats()
    t = time.perf_counter()
    assert worker.latex_equal("\\frac{7}{9}", "\\frac{14}{18}", deadline_s=1e-6) is False
    assert time.perf_counter() - t < 1.0
    after = worker.stats()
    assert after["timeouts"] == before["timeouts"] + 1 and after["restarts"] == before["restarts"] + 1
    # the replacement answers, and the timed-out verdict stays cached: same input, same result
    assert worker.latex_equal("\\frac{7}{9}", "\\frac{14}{18}") is False
    assert timed(worker.latex_equal, "\\frac{5}{9}", "\\frac{10}{18}", limit=5.0) is True


def test_worker_is_usable_from_threads_without_signals(worker):
    import signal
    import threading

    handler = signal.getsignal(signal.SIGALRM)
    checks = worker.stats()["checks"]
    results = []

    def check(i):
        results.append(answers_match(f"\\frac{{{i}}}2", f"{i / 2}"))  # unbraced: math-verify's

    threads = [threading.Thread(target=check, args=(i,)) for i in range(1, 9)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert results == [True] * 8
    assert worker.stats()["checks"] >= checks + 8  # they really went to the worker
    assert signal.getsignal(signal.SIGALRM) is handler  # math-verify's alarm was never installed


def test_worker_in_a_forked_child_is_its_own(worker):
    import os

    assert answers_match("\\frac{3}{6}", "\\frac12")
    parent_pid = worker.worker_pid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child must start its own worker, not write into the parent's pipes
        try:
            ok = answers_match("\\frac{4}{8}", "\\frac12") and worker.worker_pid() not in (None, parent_pid)
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    assert os.read(read, 1) == b"1"
    assert worker.worker_pid() == parent_pid and answers_match("\\frac{5}{10}", "\\frac12")


def test_worker_refusals_and_garbage_are_total(worker):
    assert worker.latex_equal(None, "1") is None
    assert worker.latex_equal("1", "x" * 10_000) is None
    assert worker.latex_equal("\x00", "1") is None
    assert worker.latex_equal("\\frac{", "\\frac{") in (True, False)
    assert worker.latex_equal("\ud800", "1") in (True, False)  # a lone surrogate survives the pipe


def test_a_timed_out_check_is_wrong_counted_and_logged(worker, caplog):
    before = worker.stats()["timeouts"]
    with caplog.at_level("WARNING", logger="keel.verify"):
        assert worker.latex_equal("\\frac{7}{11}", "\\frac{14}{22}", deadline_s=1e-6) is False
    assert worker.stats()["timeouts"] == before + 1
    (record,) = [r for r in caplog.records if r.name == "keel.verify"]
    assert "no verdict" in record.getMessage() and "frac{7}{11}" in record.getMessage()


def test_the_97_character_nested_sqrt_is_bounded_on_every_path(worker):
    """The issue's answer that took 1.9 s: sixteen nested square roots of 2. keel's own sympy check
    (whitelisted input, evaluated at points) and math-verify (in the worker, under its deadline)
    each stay under the deadline plus the worker's restart."""
    nested = "2"
    for _ in range(16):
        nested = f"sqrt({nested})"
    assert len(nested) == 97
    answers_match("sqrt(2)", "2")  # sympy's one-off import is not the answer's cost
    worker.clear_cache()
    assert timed(answers_match, nested, "2", limit=0.5) is False  # keel's exact layer decides
    latex = "\\sqrt{" * 12 + "2" + "}" * 12
    for pred in (nested, latex, nested.replace("sqrt", "\\sqrt")):
        assert timed(worker.latex_equal, pred, "1", limit=latex_answers.CHECK_DEADLINE_S + 1.0) is False
