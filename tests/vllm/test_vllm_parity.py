"""`keel parity` with a vLLM candidate (keel/export/parity.py over keel/engine/vllm_backend.py).

Tests marked `vllm` need vLLM and run in their own job (.ci/vllm, `pytest -m vllm tests/vllm`); the
unmarked one runs everywhere, vLLM's absence simulated where it is installed."""

import json
import sys

import pytest
import torch

from keel.engine.backends import load_backend
from keel.engine.sampler import SamplingParams
from keel.engine.vllm_backend import VLLM_MISSING, VllmSampler
from keel.export.parity import NO_LOGITS
from keel.models import init_model, render_prompt, save_model
from tests.run_cli import keel

# vLLM in fp32 computes keel's model with other kernels: its sampled tokens' log-probs agree with
# keel's torch scorer to about 1e-6 (tests/vllm/test_vllm_backend.py, LOGPROB_TOL). The mismatch
# columns compare exactly those (vLLM's recorded log-prob beside torch's teacher-forced one), so
# they get the same tolerance, far below what a wrong temperature or stale weights move (> 1e-2).
LOGPROB_TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-parity")
    model, tok = init_model("qwen3", layers=2, hidden=64, seed=1)
    save_model(model, tok, root / "model")
    return root / "model"


def test_without_vllm_parity_says_how_to_install_it(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    code, _, err = keel(monkeypatch, capsys, "parity", "--model", model_dir, "--out", tmp_path / "p",
                        "--candidate", "vllm:cpu", "--n", 2, "--max-new-tokens", 2)
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # the rest: progress lines
    assert code == 2 and errors == [f"error: {VLLM_MISSING}"] and err.strip().endswith(VLLM_MISSING), err


def test_chat_refuses_vllm_in_one_line_before_loading_it(model_dir, monkeypatch, capsys):
    """load_backend now opens vllm specs as a VllmSampler, which chat's engine cannot step."""
    code, _, err = keel(monkeypatch, capsys, "chat", "--model", model_dir, "--backend", "vllm:cpu")
    assert code == 2 and err.startswith("error: keel chat runs torch or onnxruntime, not vllm") \
        and len(err.strip().splitlines()) == 1, err


@pytest.mark.vllm
def test_load_backend_gives_a_vllm_sampler_with_per_step_top_k(model_dir):
    """Greedy completions with each step's top-k ids, most likely first: the greedy token is the
    first of them, and the rest are the next most likely under keel's torch backend."""
    sampler, tok = load_backend(model_dir, "vllm:cpu")
    torch_backend, _ = load_backend(model_dir, "torch:cpu:fp32")
    assert isinstance(sampler, VllmSampler) and sampler.name == "vllm:cpu:fp32"
    prompts = [render_prompt(tok, q) for q in ["1+2=?", "what is 7*8?"]]
    out, top = sampler.generate_with_top_k(prompts, SamplingParams(0.0, 1.0, 6), eos_id=-1, top_k=3)
    assert [len(t) for t in top] == [6, 6]
    for row, steps in zip(out.tokens, top):
        assert all(len(ids) == 3 and ids[0] == t for t, ids in zip(row, steps))
    # the first step's top 3 are torch's top 3 of the prompt's last logits
    ids = torch.tensor([prompts[0]])
    logits, _ = torch_backend.forward(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None],
                                      torch_backend.empty_past(1))
    assert top[0][0] == logits[0, -1].topk(3).indices.tolist()
    assert sampler.generate(prompts, SamplingParams(0.0, 1.0, 6), eos_id=-1).tokens == out.tokens


@pytest.mark.vllm
def test_parity_cli_vllm_against_torch_writes_parity_json(model_dir, tmp_path, monkeypatch, capsys):
    """fp32 vLLM against fp32 torch: the same greedy tokens, no logit delta measured (and no
    threshold applied to it), and a rollout mismatch at float rounding."""
    code, out, err = keel(monkeypatch, capsys, "parity", "--model", model_dir, "--out", tmp_path / "parity",
                          "--reference", "torch:cpu:fp32", "--candidate", "vllm:cpu", "--n", 8,
                          "--max-new-tokens", 12, "-o", "digits=2")
    assert code == 0, (out, err)
    saved = json.loads((tmp_path / "parity" / "parity.json").read_text())
    r = saved["candidates"]["vllm:cpu:fp32"]
    # greedy: the same tokens on every prompt (as test_vllm_backend's greedy test finds on 4 prompts)
    assert r["greedy_match"] == 1.0 and r["topk_containment"] == 1.0 and r["accuracy_drop"] == 0
    assert r["max_abs_logit_delta"] is None and r["not_measured"] == {"max_abs_logit_delta": NO_LOGITS}
    assert r["tokens"] >= 8 and r["max_abs_logprob_delta"] < LOGPROB_TOL and abs(r["mismatch_kl"]) < LOGPROB_TOL
    assert r["tis_truncated"] == 0 and r["icepop_dropped"] == 0 and r["tokens_per_s"] > 0
    assert saved["failed"] == []
    row = next(line for line in out.splitlines() if line.startswith("vllm:cpu:fp32"))
    assert row.split()[1] == "-" and f"max_abs_logit_delta not measured ({NO_LOGITS})" in out
