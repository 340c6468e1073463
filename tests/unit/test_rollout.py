"""Tests for the sampler (keel.engine.sampler, through the one engine: keel.completions.generate) on tiny
random Qwen3 / Llama models built from configs (no downloads)."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import keel.engine.backends
from keel.errors import KeelError
from keel.completions import generate
from keel.engine.sampler import Rollout, SamplingParams, sample_next, completion_logprobs

PAD = 0
NO_EOS = 49  # an id we check is never produced where a test wants full-length rows
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15], [16], [17, 18, 19, 20, 21]]  # different lengths


def tiny_model(arch: str, attn: str = "sdpa", seed: int = 0, **extra) -> torch.nn.Module:
    kw = dict(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        **extra,
    )
    cfg, cls = (Qwen3Config(**kw), Qwen3ForCausalLM) if arch == "qwen3" else (LlamaConfig(**kw), LlamaForCausalLM)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return cls(cfg).float().eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: thread fan-out only costs, and on a busy 2-core box OpenMP threads
    fighting other processes make the file many times slower. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model(request):
    return tiny_model(request.param)


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def truncate_at(seq: list[int], stops: set[int]) -> list[int]:
    """seq up to and including the first stop id."""
    for i, t in enumerate(seq):
        if t in stops:
            return seq[: i + 1]
    return seq


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Reference: full forward without cache on the growing sequence, argmax each time."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def naive_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    """Reference: unpadded single-row forward, log_softmax(logits / T) at each completion token."""
    logits = model(torch.tensor([prompt + completion])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, -1)
    return [float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(completion)]


# ----------------------------------------------------------------------------- generate vs scorer


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9), (0.7, 0.9), (0.0, 1.0)])
def test_rollout_logprobs_match_completion_logprobs(model, temperature, top_p):
    stops = {1, 2, 3, 4, 5, 6}  # ~12% stop chance per step, so completion lengths vary
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=10)
    r = generate(model, PROMPTS, params, eos_id=1, generator=gen(0), stop_ids=stops - {1})
    assert isinstance(r, Rollout) and len(r.tokens) == len(r.logprobs) == len(r.finished) == len(PROMPTS)
    for toks, lps, fin in zip(r.tokens, r.logprobs, r.finished):
        assert len(lps) == len(toks) and 1 <= len(toks) <= 10
        assert toks == truncate_at(toks, stops)  # nothing after a stop id
        assert fin == (toks[-1] in stops)
        assert all(lp <= 0 for lp in lps)

    logp_BC, mask_BC, ent = completion_logprobs(
        model, PROMPTS, r.tokens, pad_id=PAD, temperature=temperature if temperature > 0 else 1.0
    )
    C = max(len(t) for t in r.tokens)
    assert logp_BC.shape == mask_BC.shape == (len(PROMPTS), C) and ent is None
    assert logp_BC.dtype == mask_BC.dtype == torch.float32
    for i, (toks, lps) in enumerate(zip(r.tokens, r.logprobs)):
        assert mask_BC[i].tolist() == [1.0] * len(toks) + [0.0] * (C - len(toks))
        torch.testing.assert_close(logp_BC[i, : len(toks)], torch.tensor(lps), rtol=0, atol=1e-5)
    if temperature > 0:  # sampled rows: the seed above gives rows of different lengths
        assert len({len(t) for t in r.tokens}) > 1


def test_completion_logprobs_matches_unpadded_reference_with_grad_and_entropy(model):
    completions = [[30, 31], [32, 33, 34, 35], [], [36]]  # includes an empty completion
    T = 0.8
    model.zero_grad()
    logp_BC, mask_BC, ent_BC = completion_logprobs(model, PROMPTS, completions, pad_id=PAD, temperature=T, with_entropy=True)
    assert logp_BC.shape == mask_BC.shape == ent_BC.shape == (4, 4)
    assert mask_BC.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert torch.isfinite(logp_BC).all() and not ent_BC.requires_grad
    for i, (p, c) in enumerate(zip(PROMPTS, completions)):
        with torch.no_grad():
            ref = naive_logprobs(model, p, c, T)
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) - 1 + len(c)].float() / T
            ref_ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        torch.testing.assert_close(logp_BC[i, : len(c)].detach(), torch.tensor(ref), rtol=0, atol=1e-5)
        torch.testing.assert_close(ent_BC[i, : len(c)], ref_ent, rtol=0, atol=1e-5)
        assert (ent_BC[i, : len(c)] <= math.log(50) + 1e-5).all()
    # Gradient flows to the weights.
    (logp_BC * mask_BC).sum().backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad()


# ----------------------------------------------------------------------------- batch invariance, references


def test_row_does_not_depend_on_batch(model):
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    alone = generate(model, [[16, 17]], params, eos_id=NO_EOS)
    batch = generate(model, [[20, 21, 22, 23, 24, 25, 26], [16, 17], [3] * 12], params, eos_id=NO_EOS)
    assert batch.tokens[1] == alone.tokens[0]
    torch.testing.assert_close(torch.tensor(batch.logprobs[1]), torch.tensor(alone.logprobs[0]), rtol=0, atol=1e-5)


def test_greedy_matches_naive_no_cache_reference(model):
    n = 12
    r = generate(model, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=n), eos_id=NO_EOS)
    with torch.no_grad():
        refs = [naive_greedy(model, p, n) for p in PROMPTS]
    for toks, lps, fin, ref, p in zip(r.tokens, r.logprobs, r.finished, refs, PROMPTS):
        assert toks == truncate_at(ref, {NO_EOS})
        assert fin == (NO_EOS in ref)
        with torch.no_grad():
            ref_lp = naive_logprobs(model, p, toks, 1.0)  # greedy records log-probs at temperature 1
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lp), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_eager_attention_gives_same_results(arch):
    sdpa, eager = tiny_model(arch, "sdpa"), tiny_model(arch, "eager")
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=8)
    a = generate(sdpa, PROMPTS, params, eos_id=NO_EOS, generator=gen(3))
    b = generate(eager, PROMPTS, params, eos_id=NO_EOS, generator=gen(3))
    assert a.tokens == b.tokens and a.finished == b.finished
    for x, y in zip(a.logprobs, b.logprobs):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=0, atol=1e-5)
    la, ma, _ = completion_logprobs(sdpa, PROMPTS, a.tokens, pad_id=PAD, temperature=0.7)
    lb, mb, _ = completion_logprobs(eager, PROMPTS, a.tokens, pad_id=PAD, temperature=0.7)
    torch.testing.assert_close((la * ma).detach(), (lb * mb).detach(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- sampling


def test_same_seed_same_tokens_different_seed_different(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    run = lambda seed: generate(model, PROMPTS, params, eos_id=NO_EOS, generator=gen(seed)).tokens  # noqa: E731
    first = run(1)
    assert run(1) == first
    # 4 rows x up to 16 draws from a near-uniform 50-way distribution: a full collision is ~impossible.
    assert run(2) != first


def test_tiny_top_p_is_greedy(model):
    greedy = generate(model, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8), eos_id=NO_EOS)
    nucleus = generate(
        model, PROMPTS, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=8), eos_id=NO_EOS, generator=gen(5)
    )
    assert nucleus.tokens == greedy.tokens
    for x, y in zip(nucleus.logprobs, greedy.logprobs):  # both at temperature 1
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=0, atol=1e-6)


def test_sample_top_p_keeps_smallest_nucleus_and_reports_untruncated_logprob():
    # probs 0.5, 0.3, 0.15, 0.05. top_p=0.75: the mass before token 2 is 0.8 >= 0.75, so only {0, 1}
    # survive; top_p=0.85: the mass before token 3 is 0.95, so {0, 1, 2}.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits_BV = probs.log().expand(4000, 4)
    for top_p, allowed in [(0.75, {0, 1}), (0.85, {0, 1, 2}), (0.3, {0})]:
        tok_B, logp_B = sample_next(logits_BV, SamplingParams(top_p=top_p), gen(0))
        assert set(tok_B.tolist()) == allowed
        torch.testing.assert_close(logp_B, probs.log()[tok_B])  # log-prob before truncation
    # Renormalised within the nucleus {0, 1}: token 0 has probability 0.5 / 0.8 = 0.625.
    tok_B, _ = sample_next(logits_BV, SamplingParams(top_p=0.75), gen(1))
    assert abs((tok_B == 0).float().mean().item() - 0.625) < 0.03
    # Temperature 0.5 squares and renormalises the probs; the reported log-prob uses it.
    tok_B, logp_B = sample_next(logits_BV[:2], SamplingParams(temperature=0.5), gen(2))
    sq = probs**2 / (probs**2).sum()
    torch.testing.assert_close(logp_B, sq.log()[tok_B])


# ----------------------------------------------------------------------------- stopping


def test_eos_and_stop_ids_end_rows_and_stop_the_loop_early():
    model = tiny_model("qwen3")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    ref = generate(model, prompts, greedy, eos_id=NO_EOS)
    assert ref.tokens[0] == truncate_at(ref.tokens[0], {NO_EOS}) and len(ref.tokens[0]) == 10  # no EOS: full length
    assert ref.finished == [NO_EOS in t for t in ref.tokens]

    eos, stop = ref.tokens[0][3], ref.tokens[1][2]  # both rows must stop by step 4
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        r = generate(model, prompts, greedy, eos_id=eos, stop_ids=[stop])
    finally:
        handle.remove()
    for toks, lps, fin, ref_toks, ref_lps in zip(r.tokens, r.logprobs, r.finished, ref.tokens, ref.logprobs):
        assert toks == truncate_at(ref_toks, {eos, stop}) and fin
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps[: len(toks)]), rtol=0, atol=1e-6)
    assert len(r.tokens[0]) <= 4 and len(r.tokens[1]) <= 3
    # One forward per generated step (prefill + decodes), and none after every row finished.
    assert len(calls) == max(len(t) for t in r.tokens) < 10


def test_max_new_tokens_respected(model):
    for n in (1, 5):
        r = generate(model, PROMPTS, SamplingParams(max_new_tokens=n), eos_id=NO_EOS, generator=gen(0))
        for toks, fin in zip(r.tokens, r.finished):
            assert len(toks) == n or (fin and len(toks) < n)


# ----------------------------------------------------------------------------- mode, validation


def test_model_mode_restored_and_eval_during_generate():
    model = tiny_model("llama")
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    for mode in (True, False):
        model.train(mode)
        generate(model, [[1, 2]], SamplingParams(max_new_tokens=3), eos_id=NO_EOS, generator=gen(0))
        assert all(m.training is mode for m in model.modules())
        assert seen and not any(seen)  # every forward ran in eval mode (no dropout)
        seen.clear()
    model.train()
    with pytest.raises(KeelError, match="outside"):  # fails inside the call; mode still restored
        generate(model, [[1, 99]], SamplingParams(), eos_id=NO_EOS, generator=gen(0))
    assert model.training


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
    ],
)
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(KeelError, match=match) as e:
        SamplingParams(**kwargs)
    assert "\n" not in str(e.value)


def test_input_validation():
    model = tiny_model("qwen3")
    p = SamplingParams(max_new_tokens=2)
    with pytest.raises(KeelError, match="no prompts"):
        generate(model, [], p, eos_id=1)
    with pytest.raises(KeelError, match="empty"):
        generate(model, [[1], []], p, eos_id=1)
    with pytest.raises(KeelError, match="one completion per prompt"):
        completion_logprobs(model, [[1]], [[2], [3]], pad_id=PAD)
    with pytest.raises(KeelError, match="outside"):
        completion_logprobs(model, [[1]], [[50]], pad_id=PAD)
    with pytest.raises(KeelError, match="temperature"):
        completion_logprobs(model, [[1]], [[2]], pad_id=PAD, temperature=0.0)


def test_layout_left_pad_mask_and_position_ids_count_from_first_real_token():
    """Check the exact inputs the model sees. (RoPE is shift-invariant, so wrong positions would only
    show up as float noise in the tests above; here they are checked against hand-written values.)"""
    model = tiny_model("qwen3")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    params = SamplingParams(temperature=1.0, max_new_tokens=3)
    ref = generate(model, prompts, params, eos_id=NO_EOS, generator=gen(0))
    eos = ref.tokens[0][1]  # row 0 ends at its second token; row 1 runs on
    assert eos not in ref.tokens[1] and eos != ref.tokens[0][0]
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        r = generate(model, prompts, params, eos_id=eos, generator=gen(0))
        completion_logprobs(model, prompts, [[1, 2], [3]], pad_id=PAD)
    finally:
        handle.remove()
    # The first two steps draw both rows in one call, as in `ref`; the third draws row 1 alone.
    assert r.tokens[0] == ref.tokens[0][:2] and r.tokens[1][:2] == ref.tokens[1][:2] and r.finished == [True, False]
    prefill, step1, step2, score = seen
    assert prefill["input_ids"].tolist() == [[PAD, PAD, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert prefill["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert prefill["position_ids"].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert step1["input_ids"].tolist() == [[ref.tokens[0][0]], [ref.tokens[1][0]]]
    assert step1["position_ids"].tolist() == [[3], [5]]
    assert step1["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    # Row 0 finished and left the batch; the columns only it used were trimmed (none here).
    assert step2["input_ids"].tolist() == [[r.tokens[1][1]]]
    assert step2["position_ids"].tolist() == [[6]]
    assert step2["attention_mask"].tolist() == [[1] * 7]
    # Scorer: [left pad | prompt | completion | right pad], positions continue through the completion.
    assert score["input_ids"].tolist() == [[PAD, PAD, 5, 6, 7, 1, 2], [8, 9, 10, 11, 12, 3, PAD]]
    assert score["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]]
    assert score["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]


# ----------------------------------------------------------------------------- KV cache, compile


def test_sliding_window_model_matches_naive_decoding():
    # Layer 1 attends to the last 4 positions only: the cache keeps every column, the mask the window.
    model = tiny_model("qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    n = 8  # prompts of up to 8 tokens + 8 new ones: well past the window
    r = generate(model, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=n), eos_id=NO_EOS)
    with torch.no_grad():
        refs = [naive_greedy(model, p, n) for p in PROMPTS]
    assert r.tokens == [truncate_at(ref, {NO_EOS}) for ref in refs]


def test_compile_runs_decode_steps_through_the_compiled_forward(monkeypatch):
    """The plumbing only, with an identity 'compiler' (real compiling is too slow for CI;
    benchmarks/rollout_vs_hf.py --compile exercises it)."""
    model = tiny_model("llama")
    compiled = []
    monkeypatch.setattr(keel.engine.backends, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))  # compiled steps bypass module hooks
    params = SamplingParams(temperature=0.7, max_new_tokens=6)
    a = generate(model, PROMPTS, params, eos_id=NO_EOS, generator=gen(2), compile=True)
    generate(model, PROMPTS, params, eos_id=NO_EOS, generator=gen(2), compile=True)
    assert compiled == [type(model).forward] and len(calls) == 2  # compiled once; only the prefills were eager
    b = generate(model, PROMPTS, params, eos_id=NO_EOS, generator=gen(2))
    assert a.tokens == b.tokens and a.logprobs == b.logprobs


def test_compiled_decoding_matches_eager_decoding(monkeypatch):
    """Real torch.compile (inductor, no stub) against eager decoding on a 2-layer model: the
    compiled decode steps must give the eager rollout's tokens and log-probs. Compiling takes
    tens of seconds on 2 cores; a failed compile would fall back eagerly with a warning, which is
    an error here, so a broken compile cannot pass as a match."""
    import warnings

    model = tiny_model("llama", seed=3)
    monkeypatch.setattr(keel.engine.backends, "_COMPILED", {})  # compile here, not reuse another test's
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))  # compiled steps bypass module hooks
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile failed")
        compiled = generate(model, PROMPTS, params, eos_id=NO_EOS, compile=True)
    assert keel.engine.backends._COMPILED[type(model)] is not None and len(calls) == 1  # only the prefill ran eagerly
    eager = generate(model, PROMPTS, params, eos_id=NO_EOS)
    assert compiled.tokens == eager.tokens and all(len(t) == 8 for t in eager.tokens)
    for x, y in zip(compiled.logprobs, eager.logprobs):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=0, atol=1e-5)


def test_compile_failure_warns_and_redoes_the_rollout_eagerly(monkeypatch):
    model = tiny_model("qwen3")
    attempts = []

    def broken_compile(fn, **kw):
        def run(*a, **k):
            attempts.append(1)
            raise RuntimeError("no working C++ compiler\n(details)")
        return run

    monkeypatch.setattr(keel.engine.backends, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    with pytest.warns(UserWarning, match="torch.compile failed .*no working C\\+\\+ compiler.*decoding eagerly"):
        a = generate(model, PROMPTS, params, eos_id=NO_EOS, generator=gen(7), compile=True)
    b = generate(model, PROMPTS, params, eos_id=NO_EOS, generator=gen(7))
    assert a.tokens == b.tokens and a.logprobs == b.logprobs  # same generator state as a plain eager call
    generate(model, PROMPTS, params, eos_id=NO_EOS, generator=gen(7), compile=True)
    assert len(attempts) == 1  # the class is remembered as eager-only: no second attempt, no second warning
