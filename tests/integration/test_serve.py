"""The server end to end on loopback: the official openai client (plain and streamed), a table of
bad requests that must each get an OpenAI-style 4xx, client disconnects, and a bounded
concurrent load. A scripted backend makes the model's text known in advance."""

import json
import threading
import time

import httpx
import openai
import pytest
import torch

from keel.config import ServeConfig
from keel.models import build_tokenizer, init_model
from keel.serve.app import background_server, create_app, make_served
from keel.engine.backends import ListCache, TorchBackend

KEY = "test-key"
SCRIPT = "<think>1+1=2</think><answer>2</answer>"


pytestmark = pytest.mark.usefixtures("one_thread")


class ScriptedBackend(ListCache):
    """Answers SCRIPT then EOS to any prompt. Its "KV cache" is one tensor marking prompt columns
    with 1, so it also checks the engine's cache bookkeeping: the token it emits depends on how
    many real columns follow the prompt."""

    name, device, max_context = "scripted:cpu:fp32", torch.device("cpu"), 128

    def __init__(self, tokenizer, delay=0.0, forever=False):
        self.ids = tokenizer.encode(SCRIPT, add_special_tokens=False) + ([] if forever else [tokenizer.eos_token_id])
        self.vocab_size, self.delay, self.forever = len(tokenizer), delay, forever

    def empty_past(self, batch):
        return [torch.zeros(batch, 1, 0, 1)]

    def forward(self, ids_BS, mask_BT, pos_BS, past, logits_to_keep=0):
        B, S = ids_BS.shape
        if self.delay:
            time.sleep(self.delay)
        is_prompt = mask_BT[:, -S:].float() if past[0].shape[2] == 0 else torch.zeros(B, S)  # pads are no prompt
        present = torch.cat([past[0], is_prompt.view(B, 1, S, 1)], 2)
        generated = mask_BT.sum(1) - present[:, 0, :, 0].sum(1)  # real columns after the prompt
        logits = torch.full((B, S, self.vocab_size), -10.0)
        for b in range(B):
            g = int(generated[b])
            logits[b, -1, self.ids[g % len(self.ids) if self.forever else min(g, len(self.ids) - 1)]] = 10.0
        return logits, [present]


@pytest.fixture(scope="module")
def server():
    tok = build_tokenizer()
    cfg = ServeConfig(api_key=KEY, max_batch=4, max_body_bytes=4096, default_max_tokens=64)
    served = make_served(ScriptedBackend(tok, delay=0.002), tok, cfg, "scripted")
    with background_server(create_app(served, cfg)) as url:
        yield url, served


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


def chat_body(**over):
    return {"model": "scripted", "messages": [{"role": "user", "content": "1+1"}], **over}


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["scripted"]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


def test_chat_splits_reasoning_from_content(client):
    r = client.chat.completions.create(**chat_body(temperature=0))
    msg = r.choices[0].message
    assert msg.content == "<answer>2</answer>"
    assert msg.model_extra["reasoning_content"] == "1+1=2"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 4 + len("1+1=2") + len("2") + 1  # tags are single tokens, + EOS


def test_streamed_chat_adds_up_to_the_plain_answer(client):
    chunks = list(client.chat.completions.create(**chat_body(temperature=0.5, seed=1), stream=True,
                                                 stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    assert (reasoning, content) == ("1+1=2", "<answer>2</answer>")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices == []


def test_completions_plain_streamed_max_tokens_and_stop(client):
    r = client.completions.create(model="scripted", prompt="1+1\n", max_tokens=7, temperature=0)  # 7 tokens: tags are one each
    assert r.choices[0].text == "<think>1+1=2</think>" and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="scripted", prompt=[5, 6, 7], max_tokens=64, stream=True))
    assert streamed == SCRIPT
    r = client.completions.create(model="scripted", prompt="x", stop=["=2"])
    assert r.choices[0].text == "<think>1+1" and r.choices[0].finish_reason == "stop"


BAD = [  # (name, body bytes or dict, headers override, status, code)
    ("not json", b"{", None, 400, "invalid_value"),
    ("not an object", b"[1, 2]", None, 400, "invalid_value"),
    ("missing messages", {"model": "scripted"}, None, 400, "invalid_value"),
    ("messages not a list", chat_body(messages="hi"), None, 400, "invalid_value"),
    ("empty messages", chat_body(messages=[]), None, 400, "invalid_value"),
    ("unknown role", chat_body(messages=[{"role": "wizard", "content": "x"}]), None, 400, "invalid_value"),
    ("temperature a string", chat_body(temperature="0.5"), None, 400, "invalid_value"),
    ("temperature < 0", chat_body(temperature=-0.1), None, 400, "invalid_value"),
    ("top_p 0", chat_body(top_p=0), None, 400, "invalid_value"),
    ("top_p > 1", chat_body(top_p=1.5), None, 400, "invalid_value"),
    ("max_tokens 0", chat_body(max_tokens=0), None, 400, "invalid_value"),
    ("max_tokens a float", chat_body(max_tokens=2.5), None, 400, "invalid_value"),
    ("max_tokens beyond context", chat_body(max_tokens=1000), None, 400, "context_length_exceeded"),
    ("prompt beyond context", chat_body(messages=[{"role": "user", "content": "9" * 200}]), None, 400,
     "context_length_exceeded"),
    ("n over the limit", chat_body(n=17), None, 400, "invalid_value"),
    ("unknown model", chat_body(model="gpt-5"), None, 404, "model_not_found"),
    ("body over the limit", chat_body(messages=[{"role": "user", "content": "x" * 5000}]), None, 413,
     "request_too_large"),
    ("wrong api key", chat_body(), {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    ("no api key", chat_body(), {"Authorization": ""}, 401, "invalid_api_key"),
    ("text/plain body", chat_body(), {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ("form body", chat_body(), {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ("no content type", chat_body(), {"Content-Type": ""}, 415, "unsupported_media_type"),
    ("five stop strings", chat_body(stop=["a", "b", "c", "d", "e"]), None, 400, "invalid_value"),
    ("a stop string too long", chat_body(stop="x" * 129), None, 400, "invalid_value"),
    ("temperature below fp32", chat_body(temperature=1e-45, max_tokens=3), None, 200, None),
    ("top_p below fp32", chat_body(top_p=1e-46, max_tokens=3), None, 200, None),
]


@pytest.mark.parametrize("name, body, headers, status, code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error(server, name, body, headers, status, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    r = httpx.post(server[0] + "/v1/chat/completions", content=content, headers=h, timeout=30)
    assert r.status_code == status, r.text
    if status == 200:  # values at the edge of what the schema admits: answered
        assert r.json()["choices"][0]["message"]["content"] is not None
        return
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"]


def counted(url) -> dict:
    """{(path, status): responses} from /metrics."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    out = {}
    for line in text.splitlines():
        if line.startswith(("keel_http_responses_total{", "keel_http_stream_errors_total{")):
            labels, _, n = line.partition("{")[2].partition("} ")
            d = dict(kv.split("=") for kv in labels.split(","))
            key = (d["path"].strip('"'), int(d["status"].strip('"')))
            out[key] = out.get(key, 0) + int(n)
    return out


def test_bad_completion_prompts_and_routes(server):
    h = {"Authorization": f"Bearer {KEY}"}
    url = server[0]
    before = counted(url)
    for body in ({"model": "scripted", "prompt": [10**6]}, {"model": "scripted", "prompt": ""},
                 {"model": "scripted", "prompt": []}, {"model": "scripted", "prompt": "x", "echo": True, "stream": True}):
        r = httpx.post(url + "/v1/completions", json=body, headers=h)
        assert r.status_code == 400 and r.json()["error"]["message"], (body, r.text)
    assert httpx.get(url + "/v1/nothing", headers=h).status_code == 404
    assert httpx.get(url + "/v1/chat/completions", headers=h).status_code == 405
    assert httpx.get(url + "/v1/models").status_code == 401
    # still serving after all of that, and no 5xx anywhere
    assert httpx.post(url + "/v1/chat/completions", json=chat_body(), headers=h).status_code == 200
    after = counted(url)
    new = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    # every response above is counted under its status (so a 5xx would show), and none was a 5xx
    assert new == {("/v1/completions", 400): 4, ("other", 404): 1, ("/v1/chat/completions", 405): 1,
                   ("/v1/models", 401): 1, ("/v1/chat/completions", 200): 1, ("/metrics", 200): 1}, new
    assert not [k for k in after if k[1] >= 500]


def test_metrics_count_5xx():
    """The no-5xx checks above read /metrics, which could not count a 500 (Starlette answers an
    escaped exception outside the middleware that counts): a request that crashes must show."""
    tok = build_tokenizer()

    class Broken(ScriptedBackend):
        def forward(self, *a):
            raise RuntimeError("the device is gone")

        @property
        def name(self):  # /health reports it: a crash in the route itself
            raise RuntimeError("no name")

    cfg = ServeConfig(api_key=KEY)
    served = make_served(Broken(tok), tok, cfg, "scripted")
    with background_server(create_app(served, cfg)) as url:
        r = httpx.post(url + "/v1/chat/completions", json=chat_body(), headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert httpx.get(url + "/health").status_code == 500
        assert counted(url)[("/v1/chat/completions", 500)] == 1 and counted(url)[("/health", 500)] == 1


def test_client_disconnect_mid_stream_frees_the_slot():
    tok = build_tokenizer()
    cfg = ServeConfig(max_batch=1)
    served = make_served(ScriptedBackend(tok, delay=0.02, forever=True), tok, cfg, "scripted")  # >= 2 s for 100 tokens
    with background_server(create_app(served, cfg)) as url, httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/completions",
                         json={"model": "scripted", "prompt": "x", "max_tokens": 100, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        deadline = time.monotonic() + 10
        while served.engine.stats.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert served.engine.stats.cancelled == 1 and served.engine.running == 0
        assert served.engine.stats.generated_tokens < 100  # stopped early, not run to the end
        # the freed slot (max_batch=1) serves the next client at once
        r = http.post(url + "/v1/completions", json={"model": "scripted", "prompt": "x", "max_tokens": 3})
        assert r.json()["choices"][0]["text"] == "<think>1+"


def test_concurrent_load_is_batched_without_errors(server, client):
    url, served = server
    steps0, rows0 = served.engine.stats.decode_steps, served.engine.stats.decode_rows
    results, errors = [], []

    def worker():
        try:
            for _ in range(3):
                r = client.chat.completions.create(**chat_body(temperature=0))
                results.append(r.choices[0].message.content)
        except Exception as e:  # collected, asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == ["<answer>2</answer>"] * 24
    steps = served.engine.stats.decode_steps - steps0
    rows = served.engine.stats.decode_rows - rows0
    assert served.engine.stats.max_batch_seen == 4 and rows / steps > 1.5  # requests shared decode steps
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "keel_requests_running 0" in metrics and "keel_generation_tokens_total" in metrics


def test_real_model_through_the_server():
    model, tok = init_model("llama", layers=1, hidden=32, seed=0)
    cfg = ServeConfig(max_batch=2)
    served = make_served(TorchBackend(model, "cpu"), tok, cfg, "tiny")
    with background_server(create_app(served, cfg)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        plain = c.completions.create(model="tiny", prompt="12+", max_tokens=8, temperature=0)
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="tiny", prompt="12+", max_tokens=8, temperature=0, stream=True))
        assert plain.choices[0].text == streamed and plain.usage.completion_tokens >= 1


def test_chat_streams_reasoning_then_answer_and_keeps_history():
    from keel.serve.chat import chat

    tok = build_tokenizer()
    lines = iter(["1+1", "", "/reset", "again", "/exit", "never read"])
    shown = []

    def read(prompt):
        return next(lines)

    replies = chat(ScriptedBackend(tok), tok, temperature=0.0, read=read, write=shown.append)
    text = "".join(shown)
    assert replies == 2 and "never read" not in text and "(new conversation)" in text
    assert text.count("(thinking) 1+1=2\n<answer>2</answer>\n") == 2
    assert len([s for s in shown if s]) > 10  # streamed piece by piece, not in one write
