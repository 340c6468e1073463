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
