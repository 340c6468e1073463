"""`keel serve` on vLLM's engine (keel/engine/vllm_engine.py) against the torch backend, both
serving the same fp32 tiny model on loopback.

The `vllm` tests need vLLM and run in their own job (.ci/vllm, `pytest -m vllm` in .venv-vllm).
The unmarked test runs everywhere: without vLLM, `keel serve --backend vllm` says in one line how
to install it."""

import contextlib
import json
import sys
import threading
import time

import httpx
import pytest
import torch

from keel.cli import main
from keel.config import ServeConfig
from keel.engine.vllm_backend import VLLM_MISSING
from keel.engine.batching import Request
from keel.engine.sampler import SamplingParams, completion_logprobs
from keel.errors import KeelError
from keel.models import init_model, load_model, render_prompt, save_model
from keel.serve.app import background_server, create_app, load_served

NAME = "tiny"
# fp32 vLLM and fp32 torch compute the same model with other kernels: raw log-probs agree to ~1e-6
# (tests/vllm/test_vllm_backend.py); a wrong definition (temperature, penalties) moves them > 1e-2.
LOGPROB_TOL = 1e-5
PROMPTS = ["1+2=?", "what is 7*8?"]
SHARPEN = 10.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = init_model("qwen3", layers=2, hidden=64, seed=0)
    with torch.no_grad():  # sharper logits: greedy text that varies with the context, not one token repeated
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(SHARPEN)
    return save_model(model, tok, tmp_path_factory.mktemp("vllm-serve") / "model")


@pytest.fixture(scope="module")
def servers(model_dir):
    """{"torch": (url, served), "vllm": (url, served)} over the same model directory."""
    out = {}
    with contextlib.ExitStack() as stack:
        for backend in ("torch", "vllm:cpu"):
            cfg = ServeConfig(backend=backend, model_name=NAME, max_batch=4, max_waiting=16, default_max_tokens=16)
            served = load_served(model_dir, cfg)
            out[backend.partition(":")[0]] = (stack.enter_context(background_server(create_app(served, cfg))), served)
        yield out


def post(url, route, **body):
    r = httpx.post(url + route, json={"model": NAME, **body}, timeout=60)
    return r.status_code, r.json()


def streamed_text(url, route, **body) -> tuple[list[str], list]:
    """Each choice's streamed text (by index) and finish reasons, from the SSE events."""
    texts, finishes = {}, {}
    with httpx.stream("POST", url + route, json={"model": NAME, "stream": True, **body}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                part = c["delta"].get("content", "") if "delta" in c else c["text"]
                texts[c["index"]] = texts.get(c["index"], "") + (part or "")
                finishes[c["index"]] = c["finish_reason"] or finishes.get(c["index"])
    return [texts[i] for i in sorted(texts)], [finishes[i] for i in sorted(finishes)]


# ------------------------------------------------------------------ everywhere (no vLLM needed)


def test_serve_without_vllm_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    model, tok = init_model("qwen3", layers=1, hidden=32, seed=0)
    save_model(model, tok, tmp_path / "model")
    monkeypatch.setattr(sys, "argv", ["keel", "serve", "--model", str(tmp_path / "model"), "--backend", "vllm"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and VLLM_MISSING in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------ with vLLM (.ci/vllm)


@pytest.mark.vllm
def test_greedy_text_and_raw_logprobs_equal_the_torch_backends(servers):
    """Same text, finish reasons and OpenAI logprobs (raw log-softmax: sampled, top and echoed
    prompt tokens) from vLLM's engine as from keel's torch engine, on both routes."""
    results = {}
    for backend, (url, _) in servers.items():
        results[backend] = (
            post(url, "/v1/completions", prompt=PROMPTS, max_tokens=12, temperature=0, logprobs=3, echo=True),
            post(url, "/v1/chat/completions", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12,
                 temperature=0, logprobs=True, top_logprobs=2),
            # echo with max_tokens 0: the prompt's log-probs alone (lm-eval's loglikelihood)
            post(url, "/v1/completions", prompt=PROMPTS[1], max_tokens=0, echo=True, logprobs=2),
            # penalties change the greedy tokens the same way on both
            post(url, "/v1/completions", prompt=PROMPTS[1], max_tokens=12, temperature=0, presence_penalty=1.5,
                 frequency_penalty=1.0))
    plain, penalised = results["vllm"][0][1]["choices"][1]["text"], results["vllm"][3][1]["choices"][0]["text"]
    assert penalised != plain[len(PROMPTS[1]):]  # (echo puts the prompt first) the penalties were applied
    for (status_t, ref), (status_v, got) in zip(results["torch"], results["vllm"]):
        assert status_t == status_v == 200, (ref, got)
        for c_ref, c_got in zip(ref["choices"], got["choices"], strict=True):
            assert c_got.get("text", c_got.get("message")) == c_ref.get("text", c_ref.get("message"))
            assert c_got["finish_reason"] == c_ref["finish_reason"]
            lp_ref, lp_got = c_ref["logprobs"], c_got["logprobs"]
            if lp_ref is None:
                assert lp_got is None
            elif "content" in lp_ref:  # chat
                for e_ref, e_got in zip(lp_ref["content"], lp_got["content"], strict=True):
                    assert e_got["token"] == e_ref["token"] and abs(e_got["logprob"] - e_ref["logprob"]) < LOGPROB_TOL
                    assert [t["token"] for t in e_got["top_logprobs"]] == [t["token"] for t in e_ref["top_logprobs"]]
                    assert all(abs(a["logprob"] - b["logprob"]) < LOGPROB_TOL
                               for a, b in zip(e_got["top_logprobs"], e_ref["top_logprobs"]))
            else:  # completions, echo: the prompt's tokens first, the first one with null
                assert lp_got["tokens"] == lp_ref["tokens"] and lp_got["token_logprobs"][0] is None
                assert all(abs(a - b) < LOGPROB_TOL for a, b in zip(lp_got["token_logprobs"][1:],
                                                                     lp_ref["token_logprobs"][1:], strict=True))
                for t_ref, t_got in zip(lp_ref["top_logprobs"][1:], lp_got["top_logprobs"][1:], strict=True):
                    assert t_got.keys() == t_ref.keys() and all(abs(t_got[k] - t_ref[k]) < LOGPROB_TOL for k in t_ref)


@pytest.mark.vllm
def test_logprobs_are_the_models_raw_ones_whatever_the_sampler_does(servers, model_dir):
    """At temperature 2, top_p 0.9 and with penalties, each sampled token's recorded log-prob and
    top alternatives are still log_softmax of the model's logits (OpenAI's definition)."""
    _, served = servers["vllm"]
    model, tok = load_model(model_dir)
    prompt = render_prompt(tok, PROMPTS[0])
    done = threading.Event()
    req = Request(prompt, SamplingParams(2.0, 0.9, 12), torch.Generator().manual_seed(3), presence_penalty=1.0,
                  frequency_penalty=0.5, top_logprobs=2, on_done=lambda r: done.set())
    served.engine.submit(req)
    assert done.wait(60) and req.finish_reason in ("stop", "length") and len(req.raw_logprobs) == len(req.tokens)
    with torch.no_grad():
        raw = completion_logprobs(model, [prompt], [req.tokens], pad_id=tok.pad_token_id, temperature=1.0)[0][0]
        hot = completion_logprobs(model, [prompt], [req.tokens], pad_id=tok.pad_token_id, temperature=2.0)[0][0]
    assert max(abs(a - b) for a, b in zip(req.raw_logprobs, raw.tolist())) < LOGPROB_TOL
    assert max(abs(a - b) for a, b in zip(req.raw_logprobs, hot.tolist())) > 100 * LOGPROB_TOL
    for top in req.raw_top:
        assert len(top) == 2 and top[0][1] >= top[1][1]


@pytest.mark.vllm
def test_a_streamed_response_equals_the_unstreamed_one(servers):
    url, _ = servers["vllm"]
    chat = dict(messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=16, temperature=1.0, seed=4)
    _, whole = post(url, "/v1/chat/completions", **chat)
    texts, finishes = streamed_text(url, "/v1/chat/completions", **chat)
    assert texts == [whole["choices"][0]["message"]["content"]]
    assert finishes == [whole["choices"][0]["finish_reason"]]
    completion = dict(prompt=PROMPTS, max_tokens=16, temperature=0)
    _, whole = post(url, "/v1/completions", **completion)
    texts, finishes = streamed_text(url, "/v1/completions", **completion)
    assert texts == [c["text"] for c in whole["choices"]] and finishes == [c["finish_reason"] for c in whole["choices"]]


@pytest.mark.vllm
def test_a_seeded_n2_request_is_reproducible(servers):
    url, _ = servers["vllm"]
    body = dict(prompt=PROMPTS[0], n=2, max_tokens=16, temperature=1.0, seed=11)
    first = [c["text"] for c in post(url, "/v1/completions", **body)[1]["choices"]]
    again = [c["text"] for c in post(url, "/v1/completions", **body)[1]["choices"]]
    other = [c["text"] for c in post(url, "/v1/completions", **{**body, "seed": 12})[1]["choices"]]
    assert first == again and len(first) == 2
    assert first[0] != first[1]  # the two choices draw different seeds
    assert other != first
    # choice 0 of a seeded n=2 request is the n=1 request of that seed
    assert post(url, "/v1/completions", **{**body, "n": 1})[1]["choices"][0]["text"] == first[0]


@pytest.mark.vllm
def test_bad_prompts_get_400_while_a_concurrent_good_one_succeeds(servers):
    url, served = servers["vllm"]
    good = {}

    def run_good():
        good["reply"] = post(url, "/v1/completions", prompt=PROMPTS[0], max_tokens=200, temperature=0)

    thread = threading.Thread(target=run_good)
    thread.start()
    failed0 = served.engine.stats.failed
    vocab = served.backend.vocab_size
    status, body = post(url, "/v1/completions", prompt=[1, 2, vocab + 5], max_tokens=4)
    assert status == 400 and "outside" in body["error"]["message"]
    status, body = post(url, "/v1/completions", prompt=[1] * (served.context + 1), max_tokens=4)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = post(url, "/v1/completions", prompt=[1] * (served.context - 2), max_tokens=4)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    # the engine itself refuses what it cannot run, all or nothing, before anything is queued
    params = SamplingParams(0.0, 1.0, 4)
    with pytest.raises(KeelError, match="outside"):
        served.engine.submit_all([Request([1, 2], params), Request([vocab], params)])
    with pytest.raises(KeelError, match="top-k"):
        served.engine.submit(Request([1, 2], params, top_k=3))
    with pytest.raises(KeelError, match="cannot run this request: Requested sample logprobs of 25"):
        served.engine.submit(Request([1, 2], params, top_logprobs=25))  # past vLLM's max_logprobs (20)
    thread.join(60)
    status, body = good["reply"]
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    assert served.engine.stats.failed == failed0  # nothing reached the engine to fail there


@pytest.mark.vllm
def test_a_client_that_disconnects_frees_its_slot(servers):
    url, served = servers["vllm"]
    stats = served.engine.stats
    cancelled0, generated0 = stats.cancelled, stats.generated_tokens
    budget = served.context - 32
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"model": NAME, "prompt": PROMPTS[0], "max_tokens": budget, "temperature": 0,
                            "stream": True}) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 30
    while stats.cancelled == cancelled0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stats.cancelled == cancelled0 + 1 and served.engine.running == 0 and served.engine.waiting == 0
    assert stats.generated_tokens - generated0 < budget  # not run to the end
    assert not served.engine.llm.llm_engine.has_unfinished_requests()  # aborted on vLLM too: its slot is free
    status, body = post(url, "/v1/completions", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert status == 200 and (body["usage"]["completion_tokens"] == 4 or body["choices"][0]["finish_reason"] == "stop")


@pytest.mark.vllm
def test_health_and_metrics(servers):
    url, served = servers["vllm"]
    post(url, "/v1/completions", prompt=PROMPTS[0], max_tokens=3, temperature=0)
    health = httpx.get(url + "/health").json()
    assert health == {"status": "ok", "model": NAME, "backend": "vllm:cpu:fp32"}
    metrics = dict(line.rsplit(" ", 1) for line in httpx.get(url + "/metrics").text.splitlines()
                   if line and not line.startswith("#"))
    assert int(metrics["keel_requests_running"]) == 0
    assert int(metrics["keel_generation_tokens_total"]) == served.engine.stats.generated_tokens >= 3
    assert int(metrics["keel_requests_finished_total"]) == served.engine.stats.finished >= 1
    assert int(metrics["keel_decode_steps_total"]) >= 3
