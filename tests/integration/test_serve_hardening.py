"""`keel serve` against hostile and unlucky requests (issue 17 items 1-6), end to end on loopback:
numerically extreme sampling values, a request that fails (alone, as a logged and counted 5xx),
clients that leave or never finish uploading, a full queue, a deadline, big prompts, and the
header checks that keep a web page from driving a key-less server."""

import json
import logging
import socket
import threading
import time

import httpx
import pytest
import torch

from keel.config import ServeConfig
from keel.engine.backends import ListCache, TorchBackend
from keel.models import build_tokenizer, init_model
from keel.serve.app import background_server, create_app, make_served

pytestmark = pytest.mark.usefixtures("one_thread")

POISON = "#"  # a prompt starting with this character makes ToyBackend misbehave for that row


class ToyBackend(ListCache):
    """Answers "a" forever (never EOS), `delay` seconds per forward. Rows whose prompt starts with
    POISON get NaN logits (`nan`: sampling raises) or a failing prefill (`fail_prefill`)."""

    name, device, max_context = "toy:cpu:fp32", torch.device("cpu"), 128

    def __init__(self, tok, delay=0.0, nan=False, fail_prefill=False):
        self.vocab_size, self.delay, self.nan, self.fail_prefill = len(tok), delay, nan, fail_prefill
        self.a, self.poison = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids(POISON)

    def empty_past(self, batch):
        return [torch.zeros(batch, 1, 0, 1)]

    def forward(self, ids_BS, mask_BT, pos_BS, past, logits_to_keep=0):
        B, S = ids_BS.shape
        if self.delay:
            time.sleep(self.delay)
        if past[0].shape[2]:  # each row's first prompt token, as its cache holds it (pads are 0)
            first = past[0][:, 0, -1, 0]
        else:  # a left-padded prefill: each row's first real column
            first = ids_BS.gather(1, mask_BT.argmax(1, keepdim=True))[:, 0].float()
        if S > 1 and self.fail_prefill and bool((first == self.poison).any()):
            raise RuntimeError("the backend cannot take this prompt")
        present = [torch.cat([past[0], first.view(B, 1, 1, 1).expand(B, 1, S, 1)], 2)]
        logits = torch.full((B, S, self.vocab_size), -10.0)
        logits[:, :, self.a] = 10.0
        if self.nan:
            logits[first == self.poison] = float("nan")
        return logits, present


def toy_server(cfg=ServeConfig(), tok=None, **backend):
    tok = tok or build_tokenizer()
    served = make_served(ToyBackend(build_tokenizer(), **backend), tok, cfg, "toy")
    return background_server(create_app(served, cfg)), served


def completion(url, prompt="x", max_tokens=8, timeout=20, **over):
    return httpx.post(url + "/v1/completions", json={"model": "toy", "prompt": prompt, "max_tokens": max_tokens, **over},
                      timeout=timeout)


def in_threads(*calls):
    """Run the calls at once; their results (or exceptions) in order."""
    results = [None] * len(calls)

    def run(i, fn):
        try:
            results[i] = fn()
        except Exception as e:  # returned to the test, which asserts on it
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # in this order, so each joins the batch the previous ones run in
    for t in threads:
        t.join(60)
    return results


def statuses(url, key=None):
    """{(path, status): count} from /metrics, stream errors under ("stream " + path, status)."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}).text
    out = {}
    for line in text.splitlines():
        for name, prefix in (("keel_http_responses_total{", ""), ("keel_http_stream_errors_total{", "stream ")):
            if line.startswith(name):
                labels, _, n = line[len(name):].partition("} ")
                d = dict(kv.split("=") for kv in labels.split(","))
                out[(prefix + d["path"].strip('"'), int(d["status"].strip('"')))] = int(n)
    return out


def test_extreme_temperature_and_top_p_are_answered_with_their_neighbours():
    """temperature 1e-39 overflowed the logits to inf and top_p 1e-46 dropped every token: the
    sampler raised and every request in the batch got a 500."""
    model, tok = init_model("llama", layers=1, hidden=32, seed=0)
    cfg = ServeConfig(max_batch=4)
    served = make_served(TorchBackend(model, "cpu"), tok, cfg, "toy")
    with background_server(create_app(served, cfg)) as url:
        results = in_threads(*(lambda over=over: completion(url, "12+", max_tokens=16, **over)
                               for over in ({"temperature": 1.0, "seed": 1}, {"temperature": 1e-39},
                                            {"top_p": 1e-46, "seed": 2}, {"temperature": 0})))
        assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
        # below the greedy floor is greedy: the same text as temperature 0
        assert results[1].json()["choices"][0]["text"] == results[3].json()["choices"][0]["text"]
        assert not [k for k in statuses(url) if k[1] >= 500]


def test_a_failing_request_fails_alone_logged_and_counted(caplog):
    with caplog.at_level(logging.ERROR):
        server, served = toy_server(ServeConfig(max_batch=4), delay=0.01, nan=True)
        with server as url:
            good, bad, bad_streamed = in_threads(lambda: completion(url, max_tokens=40),
                                                 lambda: completion(url, POISON),
                                                 lambda: completion(url, POISON, stream=True))
            assert good.status_code == 200 and good.json()["choices"][0]["text"] == "a" * 40
            assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
            assert "generation failed" in bad.json()["error"]["message"]
            # the 200 of a stream went out before the failure: it ends with the error object
            events = [line[6:] for line in bad_streamed.text.splitlines() if line.startswith("data: ")]
            assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == "[DONE]"
            counted = statuses(url)
            assert counted[("/v1/completions", 500)] == 1 and counted[("stream /v1/completions", 500)] == 1
            assert counted[("/v1/completions", 200)] == 2
    assert any("request failed" in r.getMessage() for r in caplog.records if r.name == "keel.engine")


def test_a_request_that_fails_to_join_the_batch_still_gets_an_answer():
    """The engine took the request off the queue, the join failed, and the failure path finished
    only running and waiting requests: that client waited forever."""
    server, served = toy_server(ServeConfig(max_batch=4), delay=0.01, fail_prefill=True)
    with server as url:
        good, bad = in_threads(lambda: completion(url, max_tokens=30), lambda: completion(url, POISON + "xyz", timeout=10))
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == "a" * 30
        assert not isinstance(bad, Exception), bad  # a read timeout here: the request was orphaned
        assert bad.status_code == 500 and "cannot take this prompt" in bad.json()["error"]["message"]


def test_a_client_that_leaves_a_plain_request_cancels_it():
    """Disconnects were only noticed after a second without tokens: a client gone after 0.3 s
    still cost every token it had asked for."""
    server, served = toy_server(ServeConfig(max_batch=2), delay=0.02)
    with server as url:
        with pytest.raises(httpx.ReadTimeout):
            completion(url, max_tokens=100, timeout=0.3)
        deadline = time.monotonic() + 5
        while served.engine.stats.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert served.engine.stats.cancelled == 1 and served.engine.running == 0
        assert served.engine.stats.generated_tokens < 50


def test_a_full_queue_answers_429_with_retry_after():
    server, served = toy_server(ServeConfig(max_batch=1, max_waiting=1, request_timeout_s=5), delay=0.01)
    with server as url:
        results, threads = [], []
        for state in ((1, 0), (1, 1)):  # one running, then one waiting too: the queue is full
            threads.append(threading.Thread(target=lambda: results.append(completion(url, max_tokens=100))))
            threads[-1].start()
            deadline = time.monotonic() + 5
            while (served.engine.running, served.engine.waiting) != state and time.monotonic() < deadline:
                time.sleep(0.005)
        r = completion(url, max_tokens=5)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and "max_waiting" in r.json()["error"]["message"]
        for t in threads:
            t.join(30)
        assert [x.status_code for x in results] == [200, 200]
        assert completion(url, max_tokens=5).status_code == 200  # room again


def test_a_request_past_its_deadline_is_cancelled_with_408():
    server, served = toy_server(ServeConfig(max_batch=2, request_timeout_s=0.5), delay=0.02)
    with server as url:
        start = time.monotonic()
        r = completion(url, max_tokens=100)
        assert r.status_code == 408 and "request_timeout_s" in r.json()["error"]["message"]
        assert time.monotonic() - start < 1.5
        streamed = completion(url, max_tokens=100, stream=True)
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["code"] == "timeout"
        deadline = time.monotonic() + 5
        while served.engine.stats.cancelled < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert served.engine.stats.cancelled == 2 and served.engine.stats.generated_tokens < 100


class SlowTokenizer:
    """The real tokenizer, but encoding takes `seconds`, as a megabyte prompt did (5.5 s); counts
    encode calls."""

    def __init__(self, tok, seconds=0.0):
        self.tok, self.seconds, self.encoded = tok, seconds, 0

    def encode(self, *a, **kw):
        self.encoded += 1
        time.sleep(self.seconds)
        return self.tok.encode(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_health_answers_while_a_big_prompt_is_tokenised():
    tok = SlowTokenizer(build_tokenizer(), seconds=1.5)
    server, served = toy_server(ServeConfig(max_batch=2), tok=tok)
    with server as url:
        slow = threading.Thread(target=lambda: completion(url, "x" * 100))
        slow.start()
        while tok.encoded == 0:
            time.sleep(0.01)
        start = time.monotonic()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert time.monotonic() - start < 0.75  # not stuck behind the 1.5 s of tokenising
        slow.join(30)


def test_a_prompt_too_long_for_any_tokenisation_is_refused_before_tokenising():
    tok = SlowTokenizer(build_tokenizer())
    server, served = toy_server(ServeConfig(max_batch=2, max_body_bytes=1_000_000), tok=tok)
    longest = max(map(len, tok.get_vocab()))
    with server as url:
        for route, body in (("/v1/completions", {"prompt": "x" * 500_000}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 500_000}]})):
            r = httpx.post(url + route, json={"model": "toy", **body}, timeout=20)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            assert f"at most {128 * longest} characters" in r.json()["error"]["message"]
        assert tok.encoded == 0


def test_header_checks_and_metrics_behind_the_key():
    server, served = toy_server(ServeConfig(max_batch=2))  # no key, bound to 127.0.0.1
    with server as url:
        ok = {"model": "toy", "prompt": "x", "max_tokens": 2}
        r = httpx.post(url + "/v1/completions", content=json.dumps(ok), headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        port = url.rsplit(":", 1)[1]
        r = httpx.post(url + "/v1/completions", json=ok, headers={"Host": f"evil.example:{port}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
            assert httpx.post(url + "/v1/completions", json=ok, headers={"Host": host}).status_code == 200
    cfg = ServeConfig(api_key="k", max_batch=2)
    server, served = toy_server(cfg)
    with server as url:
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # liveness probes need no key
        port = url.rsplit(":", 1)[1]  # with a key, any Host may reach it (a proxy, a LAN name)
        assert httpx.get(url + "/health", headers={"Host": f"keel.lan:{port}"}).status_code == 200


def test_a_client_hanging_up_mid_upload_logs_no_traceback(caplog):
    server, served = toy_server(ServeConfig(max_batch=2))
    with caplog.at_level(logging.WARNING), server as url:
        host, port = url[len("http://"):].split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: 100000\r\n\r\n{{\"model\": ".encode())
            time.sleep(0.2)
        time.sleep(0.3)
        assert completion(url, max_tokens=2).status_code == 200
        assert not [k for k in statuses(url) if k[1] >= 500]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
