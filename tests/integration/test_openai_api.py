"""The OpenAI parameters clients actually send, end to end through `keel serve` on a tiny real
model: batched and token-id prompts, n > 1, logprobs / top_logprobs (checked against the model's
own log-softmax, computed here), echo, presence/frequency penalties (checked against a penalised
greedy decode done here), and the refusal of every field keel does not implement."""

import httpx
import openai
import pytest
import torch

from keel.config import ServeConfig
from keel.models import init_model
from keel.serve.app import background_server, create_app, make_served
from keel.engine.backends import TorchBackend

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model, tok = init_model("llama", layers=1, hidden=32, seed=0)
    model.eval()
    cfg = ServeConfig(max_batch=4)
    served = make_served(TorchBackend(model, "cpu"), tok, cfg, "tiny")
    with background_server(create_app(served, cfg)) as url:
        yield url, model, tok


@pytest.fixture
def client(tiny):
    return openai.OpenAI(base_url=tiny[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def logsoftmax(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def greedy(model, prompt, steps, presence=0.0, frequency=0.0, eos=None):
    """Greedy decoding with OpenAI's penalties, done here without the engine."""
    ids, out = list(prompt), []
    counts = None
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        counts = torch.zeros_like(logits) if counts is None else counts
        logits = logits - counts * frequency - (counts > 0).float() * presence
        t = int(logits.argmax())
        out.append(t)
        ids.append(t)
        counts[t] += 1
        if t == eos:
            break
    return out


def test_batched_and_token_id_prompts_with_n(client, tiny):
    _, model, tok = tiny
    p1, p2 = tok.encode("12+", add_special_tokens=False), tok.encode("7*8", add_special_tokens=False)
    r = client.completions.create(model="tiny", prompt=[p1, p2], n=3, max_tokens=6, temperature=1.0, seed=5)
    assert [c.index for c in r.choices] == list(range(6))
    # greedy is the same for every sample of a prompt, and equals the single-prompt answer
    g = client.completions.create(model="tiny", prompt=["12+", "7*8"], n=2, max_tokens=6, temperature=0)
    single = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
              for p in (p1, p2)]
    assert [c.text for c in g.choices] == [single[0], single[0], single[1], single[1]]
    assert g.usage.prompt_tokens == len(p1) + len(p2)
    assert g.usage.completion_tokens == 2 * sum(len(greedy(model, p, 6, eos=tok.eos_token_id)) for p in (p1, p2))
    # seeded sampling: reproducible, choice k of a batch equals a single request's with seed + k
    again = client.completions.create(model="tiny", prompt=[p1, p2], n=3, max_tokens=6, temperature=1.0, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    one = client.completions.create(model="tiny", prompt=p2, max_tokens=6, temperature=1.0, seed=5 + 4)
    assert one.choices[0].text == r.choices[4].text
    assert len({c.text for c in r.choices[:3]}) > 1  # the n samples of a prompt differ
    # chat n > 1
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3,
                                       max_tokens=5, temperature=0)
    assert [ch.index for ch in c.choices] == [0, 1, 2] and len({ch.message.content for ch in c.choices}) == 1


def test_streaming_n_and_batched_prompts_carry_each_choices_index(client):
    plain = client.completions.create(model="tiny", prompt=["12+", "7*8"], n=2, max_tokens=6, temperature=0.8,
                                      seed=3)
    chunks = list(client.completions.create(model="tiny", prompt=["12+", "7*8"], n=2, max_tokens=6,
                                            temperature=0.8, seed=3, stream=True,
                                            stream_options={"include_usage": True}))
    texts, finishes = {}, {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert texts == {c.index: c.text for c in plain.choices}  # each stream adds up to its plain choice
    assert finishes == {c.index: c.finish_reason for c in plain.choices}
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    chat = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3,
                                               max_tokens=4, temperature=0, stream=True))
    roles = [ch.index for c in chat for ch in c.choices if ch.delta.role == "assistant"]
    ends = [ch.index for c in chat for ch in c.choices if ch.finish_reason]
    assert sorted(roles) == [0, 1, 2] and sorted(ends) == [0, 1, 2]


def test_chat_logprobs_are_the_models_log_softmax(client, tiny):
    _, model, tok = tiny
    from keel.serve.text import render_chat
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "3+4"}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 6
    ids = tok.encode(render_chat(tok, [{"role": "user", "content": "3+4"}]), add_special_tokens=False)
    out = greedy(model, ids, len(content))
    lp = logsoftmax(model, ids + out)
    for i, entry in enumerate(content):
        row = lp[len(ids) - 1 + i]
        assert entry.token == tok.decode([out[i]]) and entry.bytes == list(entry.token.encode())
        assert abs(entry.logprob - float(row[out[i]])) < 1e-5
        top = row.topk(3)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([j]) for j in top.indices.tolist()]
        for t, v in zip(entry.top_logprobs, top.values.tolist()):
            assert abs(t.logprob - v) < 1e-5
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "3+4"}], max_tokens=6)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_and_echo(client, tiny):
    url, model, tok = tiny
    prompt = tok.encode("12+34=", add_special_tokens=False)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == tok.decode(prompt) and len(lp.tokens) == len(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = logsoftmax(model, prompt)
    for i in range(1, len(prompt)):
        assert abs(lp.token_logprobs[i] - float(ref[i - 1, prompt[i]])) < 1e-5
        top = ref[i - 1].topk(2)
        assert list(lp.top_logprobs[i]) == [tok.decode([j]) for j in top.indices.tolist()]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(prompt))]
    assert r.usage.completion_tokens == 0
    # echo + one generated token (what lm-eval's loglikelihood sends), the generated one scored too
    r = client.completions.create(model="tiny", prompt="12+34=", max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    nxt = int(ref[-1].argmax())
    assert len(lp.tokens) == len(prompt) + 1 and abs(lp.token_logprobs[-1] - float(ref[-1, nxt])) < 1e-5
    assert r.choices[0].text.startswith("12+34=")
    # logprobs without echo: generated tokens only
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, logprobs=0, temperature=0)
    assert len(r.choices[0].logprobs.token_logprobs) == len(r.choices[0].logprobs.tokens) >= 1
    assert all(t == {} for t in r.choices[0].logprobs.top_logprobs)


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 1.0), (0.7, 0.9), (1.0, -0.5)])
def test_penalties_as_openai_defines_them(client, tiny, presence, frequency):
    _, model, tok = tiny
    prompt = tok.encode("1", add_special_tokens=False)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                  presence_penalty=presence, frequency_penalty=frequency)
    want = greedy(model, prompt, 12, presence, frequency, eos=tok.eos_token_id)
    got = [t for t in r.choices[0].logprobs.tokens]
    assert got == [tok.decode([t]) for t in want if t != tok.eos_token_id]
    # and the penalty really changed the output (so this checks the penalty, not plain greedy)
    assert greedy(model, prompt, 12, eos=tok.eos_token_id) != want


def post(url, route, body):
    return httpx.post(url + route, json=body, timeout=30)


REFUSED = [  # (route, extra fields, the param the 400 must name)
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"n": 17}, "n"),
    ("/v1/chat/completions", {"logprobs": True, "stream": True}, "logprobs"),
    ("/v1/chat/completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/chat/completions", {"top_k": 5}, "top_k"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": ["a"] * 65}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 8, "n": 9}, "n"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("/v1/completions", {"logprobs": 0, "stream": True}, "logprobs"),
    ("/v1/completions", {"echo": True, "stream": True}, "echo"),
]


@pytest.mark.parametrize("route, extra, param", REFUSED, ids=[f"{r[0][4:]}-{r[2]}" for r in REFUSED])
def test_unsupported_fields_are_refused_naming_them(tiny, route, extra, param):
    base = {"model": "tiny", "max_tokens": 2}
    base.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"})
    r = post(tiny[0], route, {**base, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and param in err["message"], err


def test_neutral_values_of_unimplemented_fields_are_accepted(tiny):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi", "name": "me"}], "max_tokens": 2,
            "response_format": {"type": "text"}, "logit_bias": None, "tools": None, "user": "u1",
            "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}
    r = post(tiny[0], "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    r = post(tiny[0], "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, "best_of": 1,
                                          "suffix": None, "user": "u"})
    assert r.status_code == 200, r.text


def test_a_refused_prompt_in_a_batch_queues_nothing(tiny):
    url = tiny[0]
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": ["hi", "9" * 3000], "n": 2, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": [[1, 2], [10**6]], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    metrics = httpx.get(url + "/metrics").text
    assert "keel_requests_running 0" in metrics and '",status="5' not in metrics
