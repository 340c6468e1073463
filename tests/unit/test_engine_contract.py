"""The one sampling engine's contract (issue 13 item 1) on every installed backend (torch, and
onnxruntime through the graph the RL sampler runs): prompts admitted together are prefilled in one
left-padded batch and get what each gets alone; rows sharing a generator are sampled in one call
per step, deterministically, with the log-probs the scorer gives; the cache stays right while rows
join, retire and are trimmed; the torch backend writes its cache in place and samples a model
where it is, without copying it."""

import pytest
import torch

import keel.engine.batching as batching
from keel.completions import generate as rollout
from keel.engine.backends import OrtBackend, TorchBackend
from keel.engine.batching import Engine, Request, generate
from keel.engine.sampler import SamplingParams, completion_logprobs
from keel.models import init_model

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 0
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15], [16], [17, 18, 19, 20, 21]]  # ragged


@pytest.fixture(scope="module")
def model():
    model, _ = init_model("qwen3", layers=2, hidden=32, seed=3)
    return model.eval()


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def backend(request, model):
    if request.param == "torch":
        return TorchBackend.of(model)
    return OrtBackend.from_model(model)  # the RL rollout sampler's graph, fp32


def cache_tensors(past) -> list[torch.Tensor]:
    """The live keys and values of either backend's cache."""
    return [t for layer in past.layers for t in (layer.keys, layer.values)] if hasattr(past, "layers") else past


def left_padded(prompts):
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def naive_logprobs(model, prompt, tokens):
    """Reference without any cache: one forward over prompt + tokens, log_softmax at each step."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1)


def test_a_left_padded_prefill_gives_each_row_what_it_gets_alone(backend):
    ids, mask, pos = left_padded(PROMPTS)
    logits, past = backend.forward(ids, mask, pos, backend.empty_past(len(PROMPTS)))
    # Pad queries attend to pads only; nothing they produce may be NaN or inf: their keys and
    # values sit in the cache, and a NaN there reaches real rows through the attention matmuls.
    assert all(bool(t.isfinite().all()) for t in cache_tensors(past))
    for i, p in enumerate(PROMPTS):
        one = torch.tensor([p])
        alone, _ = backend.forward(one, torch.ones_like(one), torch.arange(len(p))[None], backend.empty_past(1))
        torch.testing.assert_close(logits[i, -len(p):], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pad_rows_stay_finite_with_either_attention(attn):
    model, _ = init_model("qwen3", layers=2, hidden=32, seed=3)
    model.config._attn_implementation = attn
    backend = TorchBackend.of(model.eval())
    ids, mask, pos = left_padded(PROMPTS)
    logits, past = backend.forward(ids, mask, pos, backend.empty_past(len(PROMPTS)))
    assert all(bool(t.isfinite().all()) for t in cache_tensors(past)) and bool(logits.isfinite().all())
    greedy = SamplingParams(0.0, 1.0, 6)
    together = generate(backend, PROMPTS, greedy, eos_id=-1)
    alone = [generate(backend, [p], greedy, eos_id=-1)[0].tokens for p in PROMPTS]
    assert [r.tokens for r in together] == alone


def test_prompts_admitted_together_are_prefilled_once_and_decode_as_if_alone(backend):
    prefills = []

    class Counting:  # the backend, recording each prefill's [rows, columns]
        def __getattr__(self, name):
            return getattr(backend, name)

        def forward(self, ids_BS, mask_BT, pos_BS, past, logits_to_keep=0):
            if ids_BS.shape[1] > 1:
                prefills.append(tuple(ids_BS.shape))
            return backend.forward(ids_BS, mask_BT, pos_BS, past, logits_to_keep)

    greedy = SamplingParams(0.0, 1.0, 8)
    together = generate(Counting(), PROMPTS + PROMPTS[:1], greedy, eos_id=-1)
    assert prefills == [(len(PROMPTS), max(len(p) for p in PROMPTS))]  # the repeated prompt shares a row
    alone = [generate(backend, [p], greedy, eos_id=-1)[0] for p in PROMPTS + PROMPTS[:1]]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    for a, b in zip(together, alone):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)


def test_rows_sharing_a_generator_sample_in_one_call_per_step(backend, model, monkeypatch):
    calls = []
    real = batching.sample_next
    monkeypatch.setattr(batching, "sample_next", lambda logits, *a: calls.append(logits.shape[0]) or real(logits, *a))
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=6)
    run = lambda seed: generate(backend, PROMPTS, params, eos_id=-1,  # noqa: E731
                                generator=torch.Generator(device=backend.device).manual_seed(seed))
    first = run(1)
    assert calls == [len(PROMPTS)] * 6  # the first token at admission, then one call per decode step
    assert [r.tokens for r in run(1)] == [r.tokens for r in first]  # the same seed, the same rollouts
    assert [r.tokens for r in run(2)] != [r.tokens for r in first]
    # The recorded log-probs are the scorer's (the RL importance ratios assume it).
    tokens = [r.tokens for r in first]
    logp_BC, mask_BC, _ = completion_logprobs(model, PROMPTS, tokens, pad_id=PAD, temperature=0.8)
    for i, r in enumerate(first):
        torch.testing.assert_close(logp_BC[i, :len(r.tokens)].detach(), torch.tensor(r.logprobs), rtol=0, atol=1e-5)
    # Requests with their own generators (keel serve) sample alone: one call per row and step.
    calls.clear()
    generate(backend, PROMPTS, params, eos_id=-1, seed=3)
    assert calls == [1] * len(PROMPTS) * 6


def test_cache_stays_right_while_rows_join_retire_and_trim(backend, model):
    """Staggered admissions (newcomers longer and shorter than the batch), rows retiring at
    different steps and the columns only they used trimmed: every token and log-prob equals a
    recomputation without any cache."""
    engine = Engine(backend, eos_id=-1, max_batch=3)
    budgets = [3, 9, 5, 7, 4]
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[3], PROMPTS[1][:6]]
    reqs = [engine.submit(Request(p, SamplingParams(0.0, 1.0, n))) for p, n in zip(prompts[:2], budgets)]
    engine.step()
    engine.step()
    reqs += [engine.submit(Request(p, SamplingParams(0.0, 1.0, n))) for p, n in zip(prompts[2:], budgets[2:])]
    widths = []
    while engine.step():
        if engine.running:
            widths.append(engine._mask_BT.shape[1])
            live = cache_tensors(engine._cache)[0].shape[2]
            assert live == widths[-1]  # the cache is exactly as wide as the mask
    assert [len(r.tokens) for r in reqs] == budgets and engine.stats.max_batch_seen == 3
    assert min(widths[1:]) < max(widths)  # a long row left and its columns were trimmed
    for r in reqs:
        ref = naive_logprobs(model, r.prompt, r.tokens)
        assert r.tokens == ref.argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor(r.logprobs), ref.max(-1).values, rtol=0, atol=1e-5)


def test_torch_decode_writes_the_cache_in_place(model):
    backend = TorchBackend.of(model)
    engine = Engine(backend, eos_id=-1, max_batch=4)
    for p in PROMPTS:
        engine.submit(Request(p, SamplingParams(0.0, 1.0, 8)))
    engine.step()  # admitted (joined into buffers sized for the whole budget) and decoded once
    buffers = [(layer.keys_buf.data_ptr(), layer.values_buf.data_ptr()) for layer in engine._cache.layers]
    for _ in range(4):
        engine.step()
        assert [(layer.keys_buf.data_ptr(), layer.values_buf.data_ptr()) for layer in engine._cache.layers] == buffers
    assert engine._cache.layers[0].capacity == max(len(p) for p in PROMPTS) + 8


def test_sampling_a_torch_model_copies_nothing_and_restores_its_mode():
    model, _ = init_model("qwen3", layers=2, hidden=32, seed=3)
    model = model.to(torch.bfloat16).train()
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    buffers = {n: (b.dtype, b.data_ptr()) for n, b in model.named_buffers()}
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    out = rollout(model, PROMPTS, SamplingParams(1.0, 1.0, 4), eos_id=-1, generator=torch.Generator().manual_seed(0))
    assert [len(t) for t in out.tokens] == [4] * len(PROMPTS)
    assert seen and not any(seen) and model.training  # eval mode while sampling, its own mode after
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params
    assert {n: (b.dtype, b.data_ptr()) for n, b in model.named_buffers()} == buffers  # fp32 buffers not cast
    assert next(model.parameters()).dtype == torch.bfloat16
