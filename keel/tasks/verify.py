"""Verifiers: pull an answer out of a completion, compare it with a reference, score the format.

Everything here runs on untrusted model output, so every public function is total (never raises,
returns None/False/0.0 instead) and does bounded work on any input. The guards, and why:

- Only the last `MAX_TAIL_CHARS` of a completion are searched: answers come last, and regexes and
  brace matching on a multi-megabyte string would otherwise cost time proportional to its size.
- Numbers longer than `MAX_NUMBER_CHARS` are not parsed: int() of a huge digit string is slow
  (quadratic) and Python 3.11+ raises ValueError past 4300 digits.
- Unicode decimal digits (Arabic-Indic '٣', fullwidth '３', ...) are NORMALISED to ASCII before
  matching, so '٨٣١' counts as 831. Without this, Python's `\\d` and `int()` would accept them in some
  places and not others; one explicit rule keeps extraction and comparison consistent.
- The symbolic fallback uses sympy's `parse_expr`, which calls eval() internally. It is only reached
  when both strings pass a strict whitelist (digits, + - * / ^ ( ) . spaces, single lowercase letters,
  `sqrt`; at most `MAX_SYMBOLIC_CHARS`; dots only inside numbers; no letter followed by a digit, as
  "z2" is one Python name), so no name, attribute or call can be smuggled into eval. Powers are
  limited (at most two, not chained, exponents a 1-2 digit number or a letter, their product <= 100)
  because `9^9^9` or `(9^99)^99` would build astronomically large numbers. Expressions are parsed
  unevaluated and compared by evaluating at points, never with `simplify` (minutes on
  `((x+1)^99)^99` vs `1`) nor exact roots (seconds factorising `sqrt(123...^99)`). `sympify` is
  never used.
- `format_reward` uses `str.count`/`str.find` rather than a backtracking regex: linear on any input.
- LaTeX equivalence beyond keel's own exact checks (`\\frac12`, units, `\\text{}`, `^\\circ`, `%`,
  `x=3`, sets, intervals, matrices, `\\log`, `\\binom`, `10!`, ...) is math-verify's, run by
  `keel.tasks.latex_answers` in a worker process with a per-check deadline and an input pre-filter
  (never `signal.alarm`, which math-verify would use and which breaks off the main thread). It is
  only asked when keel's exact checks cannot decide; without math-verify installed, answers_match
  still works as before on plain numbers, whitelisted expressions and strings.
- A hedged answer ("6 or 5", `\\boxed{6} or \\boxed{5}`) is wrong even when one candidate is right:
  rewarding it would teach a policy to list candidates.
- The Unicode minus sign (U+2212) is read as "-" when answers are compared (and by the last-number
  fallback), but kept in extracted answers, which countdown checks as expressions.
"""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction

from keel.tasks import latex_answers

MAX_TAIL_CHARS = 20_000  # extract_answer only looks at this many trailing characters
MAX_NUMBER_CHARS = 100  # parse_number refuses longer strings
MAX_SYMBOLIC_CHARS = 100  # the sympy fallback refuses longer strings
MAX_LATEX_CHARS = 1_000  # LaTeX clean-up is skipped on longer strings
MAX_EXPONENT_PRODUCT = 100  # the sympy fallback refuses powers whose exponents multiply past this

_NUMBER_IN_TEXT = re.compile(
    r"(?:(?<![\w)])-)?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?:/[0-9]+)?"
)
_PLAIN_NUMBER = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:/([0-9]+))?")
_THOUSANDS = re.compile(r"[+-]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?")
_SAFE_EXPR = re.compile(r"[0-9a-z+\-*/^(). ]+")
_POWER = re.compile(r"\^|\*\*")
_SAFE_EXPONENT = re.compile(  # ^ or ** then a 1-2 digit number, a letter, (n) or (n/m), not chained
    r"(?:\^|\*\*)\s*(?:-?\s*[0-9]{1,2}(?![0-9.])|[a-z](?![a-z(])|\(\s*-?\s*[0-9]{1,2}\s*(?:/\s*[0-9]{1,2}\s*)?\))"
    r"(?!\s*(?:\^|\*\*))"
)
_SCIENTIFIC = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][+-]?[0-9]{1,3}")
# "or" between candidates, "either", \lor: several answers offered at once.
_HEDGE = re.compile(r"(?i)\bor\b|\beither\b|\\lor(?![a-z])")
# "the answer is", "final answer:", "answer =": the final answer follows in prose.
_ANCHOR = re.compile(r"(?i)\banswer\s*(?:is\b|would be\b|will be\b|[:=])\s*(?:[:=]\s*)?")
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n|;")
_MATHY = re.compile(r"[\\^{}()\[\]/!=]")
_DOLLARS = re.compile(r"\$([^$]{1,400})\$|\\\((.{1,400}?)\\\)")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_SQRT = re.compile(r"\\sqrt\s*\{([^{}]*)\}")
# A mixed number: "2\\frac{1}{2}" is 2 + 1/2 (MATH's convention, and math-verify's), not 2 * 1/2.
_MIXED = re.compile(r"(?<![0-9.}^_])([0-9]+)\s*\\[dt]?frac\s*\{\s*([0-9]+)\s*\}\s*\{\s*([0-9]+)\s*\}")


def _ascii_digits(s: str) -> str:
    """Map every Unicode decimal digit (category Nd) to its ASCII digit; leave the rest alone."""
    if s.isascii():
        return s
    out = []
    for ch in s:
        d = unicodedata.decimal(ch, None) if not ch.isascii() else None
        out.append(str(d) if d is not None else ch)
    return "".join(out)


def _ascii_math(s: str) -> str:
    """_ascii_digits, and the minus sign U+2212 read as "-". Used when comparing answers, not when
    extracting them: countdown's expression check must still see a Unicode minus as foreign."""
    return _ascii_digits(s).replace("\u2212", "-")


def _boxed_hedge(text: str) -> str | None:
    """"A or B" when the text ends with two different boxed answers joined only by "or", "," or
    "and" (`\\boxed{6} or \\boxed{5}`), else None. `text` is at most MAX_TAIL_CHARS long."""
    last = text.rfind("\\boxed{")
    if last <= 0:
        return None
    prev = text.rfind("\\boxed{", 0, last)
    if prev < 0:
        return None
    a, b = last_boxed(text[:last]), last_boxed(text)
    if a is None or b is None or a == b:
        return None
    close = text.rfind("}", prev, last)  # end of the earlier box
    between = text[close + 1 : last].replace("$", "").replace("\\text", "").strip(" {},.\n")
    if between.lower() in ("or", "and", "", "and/or"):
        return f"{a} or {b}"
    return None


def _prose_final(text: str) -> str | None:
    """The answer after the last "answer is" / "answer:" of `text`, up to the end of its sentence:
    the math in `$...$` if any; the whole phrase if it hedges or is LaTeX-like; else its first
    number ("18 dollars" -> "18"); else the phrase itself if short. None without such a phrase."""
    anchor = None
    for anchor in _ANCHOR.finditer(text):  # linear: one pass, no backtracking across matches
        pass
    if anchor is None:
        return None
    rest = text[anchor.end() : anchor.end() + 400]
    dollars = _DOLLARS.search(rest)
    if dollars is not None and dollars.start() < 3:
        return (dollars.group(1) or dollars.group(2)).strip()
    end = _SENTENCE_END.search(rest)
    phrase = (rest[: end.start()] if end else rest).strip().strip("*").strip()
    if dollars is not None and dollars.end() <= (end.start() if end else len(rest)):
        return (dollars.group(1) or dollars.group(2)).strip()
    if not phrase:
        return None
    if _HEDGE.search(phrase) or _MATHY.search(phrase):
        return phrase
    numbers = _NUMBER_IN_TEXT.findall(phrase)
    if numbers:
        return numbers[0]
    return phrase if len(phrase) <= 100 else None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces kept whole:
    "\\boxed{\\frac{1}{2}}" gives "\\frac{1}{2}"; None when there is none or its braces never close.
    Used on model output (bounded: callers pass at most MAX_TAIL_CHARS) and on reference solutions."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The model's final answer: the content of the last `<answer>...</answer>` pair; else of the last
    `\\boxed{...}` (two different boxes joined by "or" give "A or B", a hedge); else what follows the
    last "answer is" / "answer:" (see `_prose_final`: "The answer is 18 dollars. It took me 2
    minutes." gives "18"); else the last number in the text; else None.

    With nested or repeated tags the innermost, last opened pair wins: `<answer><answer>5</answer>
    </answer>` gives "5"; an unclosed trailing `<answer>` is ignored. An empty pair gives "".
    """
    if not isinstance(text, str) or not text:
        return None
    tail = _ascii_digits(text[-MAX_TAIL_CHARS:])
    close = tail.rfind("</answer>")
    if close >= 0:
        # The last <answer> before the last </answer>, up to the first </answer> after it.
        open_ = tail.rfind("<answer>", 0, close)
        if open_ >= 0:
            start = open_ + len("<answer>")
            return tail[start : tail.find("</answer>", start)].strip()
    boxed = last_boxed(tail)
    if boxed is not None:
        return _boxed_hedge(tail) or boxed
    final = _prose_final(tail)
    if final is not None:
        return final
    numbers = _NUMBER_IN_TEXT.findall(_ascii_math(tail))
    return numbers[-1] if numbers else None


def parse_number(s) -> Fraction | None:
    """`s` as an exact Fraction if it is a plain number (int, decimal, a/b; optional sign, `$`,
    thousands commas, a trailing `.`, whitespace after the sign or around `/`), else None."""
    if isinstance(s, bool):
        return None
    if isinstance(s, (int, Fraction)):
        return Fraction(s)
    if not isinstance(s, str) or len(s) > 4 * MAX_NUMBER_CHARS:
        return None
    s = _ascii_math(s).replace("$", "").strip().rstrip(".").strip()
    if len(s) > MAX_NUMBER_CHARS:
        return None
    s = re.sub(r"^([+-])\s+", r"\1", s)
    s = re.sub(r"\s*/\s*", "/", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    m = _PLAIN_NUMBER.fullmatch(s)
    if m is None:
        return None
    sign, num, den = m.groups()
    try:
        value = Fraction(num)
        if den is not None:
            value /= int(den)
    except (ValueError, ZeroDivisionError):
        return None
    return -value if sign == "-" else value


def _delatex(s: str) -> str:
    """Rewrite the common LaTeX answer spellings (`\\frac{a}{b}`, `\\sqrt{x}`, `\\cdot`, `^{n}`, a
    `\\boxed{}` wrapper) into plain math text; leave anything else as it is."""
    if "\\" not in s and "{" not in s:
        return s
    if len(s) > MAX_LATEX_CHARS:
        return s
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\cdot", "*"),
                     ("\\times", "*"), ("\\div", "/")):
        s = s.replace(old, new)
    s = _MIXED.sub(r"(\1+\2/\3)", s)
    for _ in range(10):  # innermost first; ten levels of nesting is plenty for an answer
        t = _SQRT.sub(r"sqrt(\1)", _FRAC.sub(r"(\1)/(\2)", s))
        if t == s:
            break
        s = t
    s = re.sub(r"\^\s*\{([^{}]*)\}", r"^(\1)", s)
    return s.strip()


def _clean(s: str) -> str:
    s = s.strip()
    if len(s) <= MAX_LATEX_CHARS:  # longer text can only match by string equality
        s = _delatex(_ascii_math(s))
    return s.replace("$", "").strip().rstrip(".").strip()


def _safe_for_sympy(s: str) -> bool:
    """True only for short strings made of digits, + - * / ^ ( ) . spaces, single lowercase letters
    and `sqrt`, with dots only inside numbers and at most two small powers."""
    if len(s) > MAX_SYMBOLIC_CHARS or not _SAFE_EXPR.fullmatch(s):
        return False
    if any(len(w) > 1 and w != "sqrt" for w in re.findall(r"[a-z]+", s)):
        return False
    if re.search(r"[a-z][0-9]", s):  # "z2" would be one Python name, dodging the power checks
        return False
    if re.search(r"\(\s*\)", s):  # "()" is an empty tuple, which sympy warns about
        return False
    if re.search(r"\.(?![0-9])|[a-z)]\s*\.", s):  # no attribute access like `x.n(...)`
        return False
    powers = len(_POWER.findall(s))
    exponents = _SAFE_EXPONENT.findall(s)
    if powers > 2 or len(exponents) != powers:
        return False
    growth = 1  # bounds the size of exact powers: (b^9)^9 is fine, (b^99)^99 is not
    for e in exponents:
        growth *= max([int(d) for d in re.findall(r"[0-9]+", e)] + [1])
    return growth <= MAX_EXPONENT_PRODUCT


def _has_root(expr) -> bool:
    """True if any power in the (unevaluated) expression has a non-integer exponent: sqrt, x^(1/3)."""
    from sympy import Pow

    return any(not p.exp.is_Integer for p in expr.atoms(Pow))


def _symbolic_equal(a: str, b: str) -> bool:
    """True when two whitelisted expressions agree at three fixed rational points for their
    variables; False on anything unusual. Without roots the values are compared exactly (rational
    arithmetic); with roots, numerically to 25 of 40 significant digits (so two irrational values
    closer than that count as equal).

    Not `simplify(a - b) == 0`, and not sympy's automatic evaluation: simplify has no time bound
    (minutes on `((x+1)^99)^99` vs `1`), and exact roots of large integers run factorisations
    (seconds on `sqrt(12345678901234567890^99)`). Parsing with evaluate=False and then evaluating
    at a point, exactly only when there are no roots, keeps each call in milliseconds."""
    if not (_safe_for_sympy(a) and _safe_for_sympy(b)):
        return False
    try:
        from sympy import Rational
        from sympy.parsing.sympy_parser import (
            convert_xor,
            implicit_multiplication,
            parse_expr,
            rationalize,
            standard_transformations,
        )

        # "2x", "2sqrt(3)": implicit products; "^" is a power; decimals become exact rationals.
        transformations = standard_transformations + (implicit_multiplication, convert_xor, rationalize)
        ea = parse_expr(a, transformations=transformations, evaluate=False)
        eb = parse_expr(b, transformations=transformations, evaluate=False)
        exact = not (_has_root(ea) or _has_root(eb))
        symbols = sorted(ea.free_symbols | eb.free_symbols, key=str)
        for trial in range(3):  # distinct, non-integer points away from 0 and 1
            point = {s: Rational(3 + 2 * i + 5 * trial, 7 + i) for i, s in enumerate(symbols)}
            if exact:
                va, vb = ea.xreplace(point).doit(), eb.xreplace(point).doit()
                if not (va.is_Rational and vb.is_Rational) or va != vb:  # 1/0 gives zoo: not equal
                    return False
                continue
            va, vb = ea.evalf(40, subs=point), eb.evalf(40, subs=point)
            if not (va.is_number and vb.is_number and va.is_finite and vb.is_finite):
                return False
            if abs(va - vb) > Rational(1, 10**25) * max(1, abs(va), abs(vb)):
                return False
        return True
    except Exception:  # SyntaxError, TypeError, RecursionError, MemoryError, sympy errors, ...
        return False


def _norm_str(s: str) -> str:
    return "".join(s.split()).lower()


def _number(s: str) -> Fraction | None:
    """parse_number, plus scientific notation ("3e5", "1.5E-3") with a 1-3 digit exponent."""
    value = parse_number(s)
    if value is None and len(s) <= MAX_NUMBER_CHARS and _SCIENTIFIC.fullmatch(s.strip()):
        try:
            value = Fraction(s.strip())
        except (ValueError, ZeroDivisionError):
            return None
    return value


def _for_latex(s: str) -> str:
    """An answer as math-verify should see it: digits normalised, outer `$` and a final `.` gone."""
    s = _ascii_math(s).strip()
    if s.startswith("$") and s.endswith("$"):
        s = s.strip("$").strip()
    return s.rstrip(".").strip()


def answers_match(pred: str | None, ref: str) -> bool:
    """True when the predicted answer equals the reference. In order: a hedge ("6 or 5", unless the
    reference has an "or" too) is wrong; two plain numbers (scientific notation included) compare
    exactly; two whitelisted expressions compare symbolically (sympy, exact or at points); equal
    normalised strings match; anything else is math-verify's verdict (LaTeX, units, sets, intervals,
    matrices, equations, ...; see `keel.tasks.latex_answers`). A GSM8K-style reference
    ("... #### 72") is compared by the part after the last `####`; an answer that is itself prose
    ("The answer is 5") is reduced to its final answer first."""
    try:
        if isinstance(ref, (int, Fraction)) and not isinstance(ref, bool):
            ref = str(ref)
        if not isinstance(pred, str) or not isinstance(ref, str):
            return False
        if "####" in ref:
            ref = ref.rsplit("####", 1)[1]
        if len(pred) <= MAX_LATEX_CHARS and _ANCHOR.search(pred):
            pred = _prose_final(pred) or pred
        if len(pred) <= MAX_LATEX_CHARS and _HEDGE.search(pred) and not _HEDGE.search(ref[:MAX_LATEX_CHARS]):
            return False
        p, r = _clean(pred), _clean(ref)
        if not p or not r:
            return False
        a, b = _number(p), _number(r)
        if a is not None and b is not None:
            return a == b
        if _symbolic_equal(p, r):
            return True
        if _norm_str(p) == _norm_str(r):
            return True
        if _safe_for_sympy(p) and _safe_for_sympy(r):
            return False  # keel's exact check decided; math-verify would only add float tolerance
        return latex_answers.latex_equal(_for_latex(pred), _for_latex(ref)) is True
    except Exception:  # belt and braces: a verifier must never take the trainer down
        return False


def format_reward(text: str) -> float:
    """1.0 iff `text` is exactly `<think>X</think><answer>Y</answer>`: whitespace allowed around the
    whole and between `</think>` and `<answer>`, each tag exactly once, Y not blank; else 0.0.
    Binary on purpose: partial credit for stray tags is easy to game."""
    if not isinstance(text, str):
        return 0.0
    t = text.strip()
    if not (t.startswith("<think>") and t.endswith("</answer>")):
        return 0.0
    if any(t.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return 0.0
    think_close, answer_open = t.find("</think>"), t.find("<answer>")
    if think_close > answer_open or t[think_close + len("</think>") : answer_open].strip():
        return 0.0
    answer = t[answer_open + len("<answer>") : -len("</answer>")]
    return 1.0 if answer.strip() else 0.0
