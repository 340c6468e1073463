"""A seeded fuzz loop over the OpenAI request schema against `keel serve` on loopback (issue 17,
"Done when"): random types, sizes and values in every field, raw garbage, wrong headers, plain
and streamed, a few at a time. Bounded in count (REQUESTS) and time (BUDGET_S); it must find no
5xx (in the status, in a stream's error event, or in /metrics), no hang (every request answers
within its client timeout and the engine ends idle) and no memory growth beyond a bound.

KEEL_FUZZ_SEED picks another seed (the failing body is printed with its index to replay it)."""

import json
import os
import random
import resource
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from keel.config import ServeConfig
from keel.engine.backends import TorchBackend
from keel.models import init_model
from keel.serve.app import background_server, create_app, make_served

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = int(os.environ.get("KEEL_FUZZ_SEED", "17"))
REQUESTS = 200
BUDGET_S = 40.0          # the loop stops sending after this, whatever is left
CLIENT_TIMEOUT_S = 30.0  # a request unanswered by then is a hang
MAX_RSS_GROWTH_MB = 150  # from the end of the first third to the end

# every field of the schema and a few it does not implement; the numeric ones weigh more, since
# their edge values reach the sampler
FIELDS = {"model": 1, "messages": 2, "prompt": 2, "temperature": 4, "top_p": 4, "max_tokens": 2,
          "max_completion_tokens": 1, "n": 2, "stop": 2, "seed": 1, "stream": 3, "stream_options": 1,
          "logprobs": 2, "top_logprobs": 1, "echo": 1, "presence_penalty": 2, "frequency_penalty": 2, "user": 1,
          "logit_bias": 1, "response_format": 1, "tools": 1, "best_of": 1, "suffix": 1, "metadata": 1}


def any_value(rng: random.Random, depth: int = 0):
    """A random JSON value of a random type and size."""
    kind = rng.choice(["null", "bool", "int", "bigint", "float", "tiny", "str", "unicode", "list", "dict"]
                      if depth < 2 else ["null", "bool", "int", "float", "str"])
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, 1, -1, 2, 7, 16, 17, 64, 65, 128, 511, 512, 513, 10**6, -(10**6)])
    if kind == "bigint":
        return rng.choice([2**63, -(2**63) - 1, 2**64, 10**30])
    if kind == "float":
        return rng.choice([0.0, -0.0, 0.5, 1.0, 1.5, 2.0, 2.0000001, -1e-9, 1e308, -1e308, 3.4e38, 1e-7])
    if kind == "tiny":
        return rng.choice([1e-45, 1e-46, 5e-324, 1e-38, 1e-39, 1e-30, 1e-6, 1e-5])
    if kind == "str":
        return "".join(rng.choice("ab 1+=\n<think>") for _ in range(rng.choice([0, 1, 5, 50, 3000])))
    if kind == "unicode":
        return "".join(chr(rng.choice([0, 0x7F, 0xE9, 0x4E2D, 0x1F600, 0xFFFD, 0xD800, 0x10FFFF]))
                       for _ in range(rng.randint(1, 20)))
    if kind == "list":
        return [any_value(rng, depth + 1) for _ in range(rng.choice([0, 1, 3, 70]))]
    return {rng.choice(["role", "content", "type", "text", "include_usage", "x"]): any_value(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def plausible(rng: random.Random, field: str):
    """A value of the right type for `field`, at or past the edges of its range."""
    if field in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        return rng.choice([0, 0.0, 1e-46, 1e-45, 1e-40, 1e-39, 1e-9, 0.3, 1.0, 2.0, -2.0, 2.5, -0.1])
    if field in ("max_tokens", "max_completion_tokens"):
        return rng.choice([0, 1, 3, 8, 40, 500, 511, 100000])
    if field == "n":
        return rng.choice([1, 2, 4, 16, 17])
    if field == "stop":
        return rng.choice(["1", "\n", "", ["a", "b"], ["=", "+", "1", "2"], ["x"] * 5, "y" * 200, "<think>"])
    if field == "seed":
        return rng.choice([0, 1, -5, 2**63 - 1, 2**64])
    if field in ("stream", "echo"):
        return rng.random() < 0.5
    if field == "stream_options":
        return {"include_usage": rng.random() < 0.5}
    if field == "logprobs":
        return rng.choice([True, False, 0, 1, 5, 20, 21])
    if field == "top_logprobs":
        return rng.choice([0, 3, 20, 21])
    if field == "prompt":
        return rng.choice(["12+", "", "x" * 600, [1, 2, 3], [[4, 5], [6]], [10**6], [-1], [], [[]],
                           ["a", "b"], [["a"]], list(range(100)), "\ud800"])
    if field == "messages":
        return rng.choice([[{"role": "user", "content": "1+1"}],
                           [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                           [{"role": "assistant", "content": "a"}], [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                           [{"role": "user", "content": None}], [{"role": "tool", "content": "t"}], []])
    return any_value(rng)


def fuzz_case(rng: random.Random) -> dict:
    """One request: method, path, headers and body bytes."""
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": "tiny", "max_tokens": rng.choice([1, 4, 8, 16])}
    body.update({"messages": [{"role": "user", "content": "12+3"}]} if chat else {"prompt": "12+3"})
    for field in set(rng.choices(list(FIELDS), list(FIELDS.values()), k=rng.randint(0, 3))):
        body[field] = plausible(rng, field) if rng.random() < 0.7 else any_value(rng)
    if rng.random() < 0.1:
        body.pop(rng.choice(list(body)))
    content = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    roll = rng.random()
    if roll < 0.04:
        content = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 100])))  # not JSON at all
    elif roll < 0.08:
        content = content[: rng.randrange(max(len(content), 1))]  # cut short
    elif roll < 0.11:
        headers["Content-Type"] = rng.choice(["text/plain", "application/x-www-form-urlencoded", ""])
    elif roll < 0.13:
        content = json.dumps(any_value(rng)).encode()  # valid JSON, anything but an object of the schema
    elif roll < 0.15:
        path = rng.choice(["/v1/models", "/health", "/v1/nothing", "/v1/completions/"])
    method = "GET" if path in ("/v1/models", "/health") else "POST"
    return {"method": method, "path": path, "headers": headers, "content": content}


def rss_mb() -> float:
    """Resident memory now (Linux), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_fuzz_the_openai_schema_finds_no_5xx_hang_or_growth():
    rng = random.Random(SEED)
    cases = [fuzz_case(rng) for _ in range(REQUESTS)]
    model, tok = init_model("llama", layers=1, hidden=32, seed=0)
    cfg = ServeConfig(max_batch=4, max_body_bytes=20_000, default_max_tokens=8, request_timeout_s=CLIENT_TIMEOUT_S / 2)
    served = make_served(TorchBackend(model, "cpu"), tok, cfg, "tiny")
    problems, sent, rss, answered = [], 0, [], Counter()
    with background_server(create_app(served, cfg)) as url, httpx.Client(timeout=CLIENT_TIMEOUT_S) as http:
        assert url.startswith("http://127.0.0.1:")  # loopback only

        def send(i: int):
            case = cases[i]
            try:
                r = http.request(case["method"], url + case["path"], headers=case["headers"], content=case["content"])
            except httpx.TimeoutException:
                return i, "no answer within the client timeout (a hang)"
            except httpx.HTTPError as e:  # a connection dropped or a stream cut short
                return i, f"{type(e).__name__}: {e}"
            answered[r.status_code // 100] += 1
            if r.status_code >= 500:
                return i, f"status {r.status_code}: {r.text[:300]}"
            if r.headers.get("content-type", "").startswith("text/event-stream"):
                events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
                if not events or events[-1] != "[DONE]":
                    return i, f"a stream that did not end with [DONE]: {r.text[-300:]}"
                errors = [e for e in events[:-1] if '"error"' in e and json.loads(e).get("error")]
                if any(json.loads(e)["error"]["type"] == "server_error" for e in errors):
                    return i, f"a stream that failed: {errors}"
            return i, None

        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=3) as pool:
            for third in (cases[: REQUESTS // 3], cases[REQUESTS // 3:]):
                futures = []
                for _ in third:
                    if time.monotonic() - start > BUDGET_S:
                        break
                    futures.append(pool.submit(send, sent))
                    sent += 1
                for f in futures:
                    i, problem = f.result()
                    if problem:
                        problems.append(f"case {i} (seed {SEED}) {cases[i]['method']} {cases[i]['path']} "
                                        f"{cases[i]['content'][:300]!r}: {problem}")
                rss.append(rss_mb())
        metrics = httpx.get(url + "/metrics").text
        deadline = time.monotonic() + 10
        while (served.engine.running or served.engine.waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        idle = (served.engine.running, served.engine.waiting)
    assert not problems, "\n".join(problems[:10])
    assert sent >= REQUESTS // 2, f"only {sent} requests in {BUDGET_S} s"
    assert answered[2] >= sent // 5 and answered[4] >= sent // 5, answered  # both generation and refusals exercised
    fivexx = [line for line in metrics.splitlines() if 'status="5' in line]
    assert not fivexx, fivexx
    assert idle == (0, 0)
    assert rss[-1] - rss[0] < MAX_RSS_GROWTH_MB, rss
