"""LaTeX answer equivalence by math-verify, run in a worker process under a per-check deadline.

`math_verify.parse` / `math_verify.verify` (the HF library TRL, verl and AReaL use) do the LaTeX
work: `\\frac12`, units and `\\text{}`, `^\\circ`, `%`, `x=3`, sets, tuples, intervals, matrices,
mixed numbers, `\\sqrt[3]{}`, `\\log`, `\\binom`, `10!`, ... keel's own layer (verify.py) does the
rest: extraction, digit normalisation, hedges, and the cheap exact checks that never need a worker.

Why a worker process, and not math-verify's own timeout: math-verify bounds time with
`signal.alarm`, which only works in the main thread of the main interpreter and replaces whatever
SIGALRM handler the trainer has. So it is always called here with its timeouts disabled
(`parsing_timeout=None`, `timeout_seconds=None`), and time is bounded from outside:

- `safe_for_math_verify` refuses, before any work, the inputs known to blow up sympy: long strings,
  chained powers (`2^9^9`, `9^{9^9}`), powers whose exponents multiply past `MAX_EXPONENT_PRODUCT`
  or would build numbers of more than `MAX_POWER_DIGITS` digits, factorials of more than
  `MAX_FACTORIAL` or of an expression, binomials of more than 10 * `MAX_FACTORIAL`, `**`. These
  are cheap scans, linear in the (at most `MAX_ANSWER_CHARS`) input.
- Whatever still turns out slow is cut by the deadline: the check runs in one persistent child
  process (`python -c`, a fresh interpreter: no fork of a process holding CUDA or threads, no
  re-import of the trainer's `__main__` as multiprocessing's spawn would do) that speaks one JSON
  line per request over pipes. The parent waits at most `CHECK_DEADLINE_S` with `select`; past it
  the child is killed, a fresh one is started at once (its import time is not charged to the next
  check's deadline) and the check counts as not equal, with a warning on the "keel.verify" logger
  and a count in `stats()`.

Results are cached per process (same input -> same result within a run, timeouts included). A check
that lands near the deadline could in principle differ between runs on a heavily loaded machine;
the deadline is two orders of magnitude above a normal check (milliseconds) so that does not happen
in practice. Every public function is total: any failure (math-verify not installed, worker dead,
garbage output) gives None ("could not decide"), never an exception.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict

log = logging.getLogger("keel.verify")  # a timed-out check is a warning here, and counted in stats()

CHECK_DEADLINE_S = 2.0  # wall time one comparison may take in the worker
STARTUP_DEADLINE_S = 60.0  # a fresh worker must import math-verify within this
MAX_ANSWER_CHARS = 400  # longer answers are not sent to math-verify
MAX_EXPONENT_PRODUCT = 200  # product of all numeric exponents in one answer: ((x+1)^30)^30 is out
MAX_POWER_DIGITS = 2_000  # (digits of the longest number) * exponent product
MAX_FACTORIAL = 1_000  # n! only for n up to this
MAX_POWERS = 6
CACHE_SIZE = 8_192

_EXPONENT = re.compile(r"\^\s*(\{[^{}]*\}|\([^()]*\)|-?\s*[0-9]+(?:\.[0-9]+)?|\\?[A-Za-z]+|.)")
_FACTORIAL = re.compile(r"([0-9]+|[)}\]])\s*!")
_BINOM = re.compile(r"\\[dt]?binom\s*\{?\s*([0-9]+)")

# The worker: reads {"pred", "ref"} lines, answers "1", "0" or "E" (error) lines. sys.path[0] is the
# working directory under -c; it is dropped so a stray local module cannot shadow a library.
_WORKER_SOURCE = r"""
import sys
sys.path.pop(0)
import json, logging, os
out = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the protocol's own handle on the pipe
os.dup2(2, 1)  # anything a library prints goes to stderr (discarded), never into the protocol
sys.stdout = sys.stderr
logging.disable(logging.CRITICAL)
from math_verify import parse, verify

def parse_answer(s):
    tries = [s] if "\\boxed" in s else ["\\boxed{" + s + "}", "$" + s + "$", s]
    for t in tries:
        found = parse(t, parsing_timeout=None)
        if found:
            return found
    return []

parse_answer("\\frac{1}{2}")  # warm the grammar and sympy caches before saying ready
out.write("ready\n"); out.flush()
for line in sys.stdin:
    try:
        req = json.loads(line)
        gold = parse_answer(req["ref"])
        pred = parse_answer(req["pred"])
        ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
        out.write("1\n" if ok else "0\n")
    except BaseException:
        out.write("E\n")
    out.flush()
"""


def available() -> bool:
    """True when math-verify is installed (checked without importing it in this process)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            import importlib.util

            _AVAILABLE = importlib.util.find_spec("math_verify") is not None
        except Exception:
            _AVAILABLE = False
    return _AVAILABLE


_AVAILABLE: bool | None = None


def _disable() -> None:
    global _AVAILABLE
    _AVAILABLE = False


def safe_for_math_verify(s: str) -> bool:
    """True for answers short and tame enough to hand to sympy: see the module docstring."""
    if not isinstance(s, str) or not s.strip() or len(s) > MAX_ANSWER_CHARS or "\x00" in s:
        return False
    if "**" in s or s.count("^") > MAX_POWERS:
        return False
    product = 1.0
    for m in _EXPONENT.finditer(s):
        exponent = m.group(1)
        if exponent == "{":  # a braced exponent with braces inside: take it whole
            depth, j = 0, m.start(1)
            for j in range(m.start(1), len(s)):  # bounded: len(s) <= MAX_ANSWER_CHARS
                depth += {"{": 1, "}": -1}.get(s[j], 0)
                if depth == 0:
                    break
            exponent = s[m.start(1) : j + 1]
            end = j + 1
        else:
            end = m.end()
        if "^" in exponent or s[end : end + 3].lstrip().startswith("^"):  # 2^9^9, 9^{9^9}, 2^{9}^{9}
            return False
        for x in re.findall(r"[0-9]+(?:\.[0-9]+)?", exponent):
            product *= max(1.0, abs(float(x)))
    if product > MAX_EXPONENT_PRODUCT:
        return False
    longest = max((len(x) for x in re.findall(r"[0-9]+", s)), default=0)
    if longest * product > MAX_POWER_DIGITS:
        return False
    for m in _FACTORIAL.finditer(s):
        n = m.group(1)
        if not n.isdigit() or len(n) > 4 or int(n) > MAX_FACTORIAL:
            return False
    if s.count("!") > 3:
        return False
    for n in _BINOM.findall(s):  # \binom{100000}{50000} takes most of a second
        if len(n) > 5 or int(n) > MAX_FACTORIAL * 10:
            return False
    return True


class _Worker:
    """One child process running `_WORKER_SOURCE`; owned by the process (pid) that started it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", _WORKER_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        self.buffer = b""
        self.ready = False

    def read_line(self, deadline: float) -> bytes | None:
        """One line from the child, or None past `deadline` (time.monotonic) or on EOF."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def wait_ready(self) -> bool:
        if not self.ready:
            self.ready = self.read_line(time.monotonic() + STARTUP_DEADLINE_S) == b"ready"
        return self.ready

    def ask(self, pred: str, ref: str, deadline_s: float) -> bool | None:
        if not self.wait_ready():
            return None
        request = json.dumps({"pred": pred, "ref": ref}) + "\n"
        self.proc.stdin.write(request.encode("utf-8", "replace"))
        self.proc.stdin.flush()
        line = self.read_line(time.monotonic() + deadline_s)
        if line == b"1":
            return True
        if line == b"0":
            return False
        return None

    def close(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass


_LOCK = threading.Lock()
_WORKER: _Worker | None = None
_CACHE: OrderedDict[tuple[str, str], bool] = OrderedDict()
_STATS = {"checks": 0, "timeouts": 0, "restarts": 0}


def _worker() -> _Worker:
    global _WORKER
    if _WORKER is None or _WORKER.pid != os.getpid() or _WORKER.proc.poll() is not None:
        # In a forked child the parent's worker belongs to the parent: leave it, start our own.
        if _WORKER is not None and _WORKER.pid == os.getpid():
            _WORKER.close()
        _WORKER = _Worker()
    return _WORKER


def warm_up() -> bool:
    """Start the worker and wait until it is ready (a second or so); True when it is."""
    if not available():
        return False
    try:
        with _LOCK:
            return _worker().wait_ready()
    except Exception:
        return False


def shutdown() -> None:
    """Stop this process's worker (a later check starts a new one)."""
    global _WORKER
    with _LOCK:
        if _WORKER is not None and _WORKER.pid == os.getpid():
            _WORKER.close()
        _WORKER = None


atexit.register(shutdown)


def _after_fork_in_child() -> None:
    # The lock may have been held by another thread at fork time; the worker is the parent's.
    global _LOCK, _WORKER
    _LOCK = threading.Lock()
    _WORKER = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def clear_cache() -> None:
    """Forget cached verdicts (benchmarks time uncached checks with it)."""
    with _LOCK:
        _CACHE.clear()


def worker_pid() -> int | None:
    """The process id of this process's worker, None when none is running."""
    w = _WORKER
    return w.proc.pid if w is not None and w.pid == os.getpid() and w.proc.poll() is None else None


def stats() -> dict:
    """Counts since import: checks sent to the worker, timeouts, worker restarts."""
    return dict(_STATS)


def latex_equal(pred: str, ref: str, deadline_s: float | None = None) -> bool | None:
    """math-verify's verdict on `pred` against the reference `ref` (both answer strings, not whole
    completions): True or False (False too past the deadline, or when the worker fails: the worker is
    then replaced and the verdict cached); None when it was not asked (math-verify not installed,
    input refused by `safe_for_math_verify`). Never raises."""
    global _WORKER
    try:
        if not (isinstance(pred, str) and isinstance(ref, str)):
            return None
        if not (safe_for_math_verify(pred) and safe_for_math_verify(ref)) or not available():
            return None
        key = (pred, ref)
        with _LOCK:
            if key in _CACHE:
                _CACHE.move_to_end(key)
                return _CACHE[key]
            _STATS["checks"] += 1
            worker = _worker()
            if not worker.wait_ready():  # it cannot even start (math-verify broken): stop trying
                worker.close()
                _WORKER = None
                _disable()
                return None
            answer = worker.ask(pred, ref, CHECK_DEADLINE_S if deadline_s is None else deadline_s)
            if answer is None:  # timed out, died or garbled: replace it now, count as not equal
                _STATS["timeouts"] += 1
                log.warning("math-verify gave no verdict within %.1fs on %.80r vs %.80r: counted as not equal",
                            CHECK_DEADLINE_S if deadline_s is None else deadline_s, pred, ref)
                _STATS["restarts"] += 1
                worker.close()
                _WORKER = _Worker()  # starts importing in the background right away
                answer = False
            _CACHE[key] = answer
            if len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
            return answer
    except Exception:
        return None
