"""Continuous batching: requests that join and leave mid-flight get exactly what they would get
alone, slots free up, and the cache never grows wider than the longest running row."""

import pytest

from keel.errors import KeelError
from keel.models import init_model, render_prompt, special_ids
from keel.engine.sampler import SamplingParams
from keel.completions import generate as rollout_generate
from keel.engine.backends import TorchBackend, parse_spec
from keel.engine.batching import Engine, Request, generate


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model, tok = init_model("qwen3", layers=2, hidden=64, seed=3)
    return model, tok, TorchBackend(model, "cpu")


QUESTIONS = ["1+1", "123+456", "9", "a longer question than the others", "77*3"]


def test_engine_matches_rollout_engine_for_staggered_requests(tiny):
    model, tok, backend = tiny
    eos, _ = special_ids(tok)
    prompts = [render_prompt(tok, q) for q in QUESTIONS]
    greedy = SamplingParams(0.0, 1.0, 12)
    alone = [rollout_generate(model, [p], greedy, eos_id=eos).tokens[0] for p in prompts]

    engine = Engine(backend, eos_id=eos, max_batch=3)
    reqs = [engine.submit(Request(p, greedy)) for p in prompts[:2]]
    for _ in range(4):  # the first two run ahead; the rest join a batch already in flight
        engine.step()
    reqs += [engine.submit(Request(p, greedy)) for p in prompts[2:]]
    widths = []
    while engine.step():
        widths.append(engine._mask_BT.shape[1] if engine._rows else 0)
        assert engine.running <= 3
    assert [r.tokens for r in reqs] == alone
    assert all(r.finish_reason in ("stop", "length") for r in reqs)
    assert engine.stats.max_batch_seen == 3
    longest = max(len(p) for p in prompts) + greedy.max_new_tokens
    assert max(widths) <= longest  # trimmed: never wider than the longest row


def test_finished_rows_leave_and_cache_is_trimmed(tiny):
    _, tok, backend = tiny
    eos, _ = special_ids(tok)
    engine = Engine(backend, eos_id=eos, max_batch=4)
    long_prompt, short_prompt = render_prompt(tok, "x" * 40), render_prompt(tok, "1")
    short = engine.submit(Request(short_prompt, SamplingParams(0.0, 1.0, 6)))
    long = engine.submit(Request(long_prompt, SamplingParams(0.0, 1.0, 2)))
    engine.step()  # both admitted and decoded once: the long row is done and leaves
    assert long.finish_reason == "length" and engine.running == 1
    # the columns only the long row used are gone: short prompt + its first token
    assert engine._mask_BT.shape[1] == len(short_prompt) + 1
    assert engine._cache.get_seq_length() == len(short_prompt) + 1 and bool(engine._mask_BT.all())
    engine.run_until_idle()
    assert short.done and engine.running == 0 and engine._cache is None


def test_cancel_frees_the_slot(tiny):
    _, tok, backend = tiny
    eos, _ = special_ids(tok)
    engine = Engine(backend, eos_id=eos, max_batch=1)
    first = engine.submit(Request(render_prompt(tok, "1+1"), SamplingParams(0.0, 1.0, 50)))
    second = engine.submit(Request(render_prompt(tok, "2+2"), SamplingParams(0.0, 1.0, 3)))
    engine.step()
    assert engine.running == 1 and engine.waiting == 1
    first.cancel()
    engine.step()  # the cancelled row leaves, the waiting one takes its slot
    assert first.finish_reason == "cancelled" and len(first.tokens) < 50
    assert engine.running == 1 and engine.waiting == 0
    engine.run_until_idle()
    assert second.finish_reason == "length" and len(second.tokens) == 3
    assert engine.stats.cancelled == 1


def test_seeded_sampling_is_reproducible_and_stop_ids_end_rows(tiny):
    _, tok, backend = tiny
    eos, _ = special_ids(tok)
    prompts = [render_prompt(tok, q) for q in QUESTIONS]
    params = SamplingParams(1.0, 0.9, 10)
    a = generate(backend, prompts, params, eos_id=eos, seed=7, max_batch=2)
    b = generate(backend, prompts, params, eos_id=eos, seed=7, max_batch=2)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    stop = a[0].tokens[1]
    c = generate(backend, prompts[:1], params, eos_id=eos, seed=7, stop_ids={stop})
    assert c[0].tokens[-1] == stop and c[0].finish_reason == "stop"
    assert len(c[0].tokens) == a[0].tokens.index(stop) + 1


def test_a_group_of_identical_prompts_is_prefilled_once_and_samples_as_if_alone(tiny):
    _, tok, backend = tiny
    eos, _ = special_ids(tok)
    group = [render_prompt(tok, "12+34")] * 4 + [render_prompt(tok, "5")] * 2
    params = SamplingParams(1.0, 1.0, 8)
    prefills = []

    class Counting:  # the backend, recording the length of each prefill it runs
        def __getattr__(self, name):
            return getattr(backend, name)

        def forward(self, ids_BS, mask_BT, pos_BS, past, logits_to_keep=0):
            if past.get_seq_length() == 0:
                prefills.append(tuple(ids_BS.shape))
            return backend.forward(ids_BS, mask_BT, pos_BS, past, logits_to_keep)

    together = generate(Counting(), group, params, eos_id=eos, seed=11, max_batch=len(group))
    assert prefills == [(2, len(group[0]))]  # one prefill, one row per distinct prompt
    # Request i samples from seed 11 + i in both runs: alone (one row, its own prefill) it draws the same.
    alone = [generate(backend, [p], params, eos_id=eos, seed=11 + i)[0].tokens for i, p in enumerate(group)]
    assert [r.tokens for r in together] == alone
    assert len({tuple(t) for t in alone[:4]}) > 1  # the group's samples differ: generators, not the cache, decide


def test_submit_rejects_bad_prompts(tiny):
    _, tok, backend = tiny
    eos, _ = special_ids(tok)
    engine = Engine(backend, eos_id=eos)
    with pytest.raises(KeelError, match="empty"):
        engine.submit(Request([], SamplingParams(0.0, 1.0, 4)))
    with pytest.raises(KeelError, match="outside"):
        engine.submit(Request([backend.vocab_size], SamplingParams(0.0, 1.0, 4)))
    with pytest.raises(KeelError, match="exceeds the context"):
        engine.submit(Request([5] * 10, SamplingParams(0.0, 1.0, backend.max_context)))
    assert engine.waiting == 0


def test_top_k_is_recorded_per_step(tiny):
    _, tok, backend = tiny
    eos, _ = special_ids(tok)
    (r,) = generate(backend, [render_prompt(tok, "5+5")], SamplingParams(0.0, 1.0, 6), eos_id=eos, top_k=5)
    assert len(r.topk) == len(r.tokens) and all(len(k) == 5 for k in r.topk)
    assert all(k[0] == t for k, t in zip(r.topk, r.tokens))  # greedy picks the top-1


def test_parse_spec():
    assert parse_spec("torch") == ("torch", "cpu", "fp32")
    assert parse_spec("onnxruntime:cuda") == ("onnxruntime", "cuda", "fp32")
    assert parse_spec("torch:npu:bf16") == ("torch", "npu", "bf16")
    for bad in ("tensorflow:cpu", "torch:cpu:fp8", "torch:a:b:c"):
        with pytest.raises(KeelError):
            parse_spec(bad)
