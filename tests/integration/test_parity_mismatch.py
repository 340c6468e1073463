"""`keel parity`'s rollout mismatch columns: what an RL run sampling on the candidate would log."""

import json

import pytest

from keel.config import ParityConfig
from keel.export.parity import run_parity
from keel.models import init_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")

CANDIDATES = ["torch:cpu:fp32", "torch:cpu:bf16", "onnxruntime:cpu:int8"]


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mismatch")
    model, tok = init_model("qwen3", layers=2, hidden=64, seed=1)
    save_model(model, tok, root / "model")
    cfg = ParityConfig(n=6, max_new_tokens=8, batch=4)
    result, _ = run_parity(root / "model", "torch:cpu:fp32", CANDIDATES, root / "parity", cfg)
    return root, result


def test_parity_mismatch_of_the_same_backend_is_rounding_and_of_bf16_and_int8_is_not(parity_run):
    root, result = parity_run
    saved = json.loads((root / "parity" / "parity.json").read_text())
    assert saved["candidates"] == result["candidates"]
    fp32, bf16, int8 = (saved["candidates"][c] for c in CANDIDATES)
    for r in (fp32, bf16, int8):
        assert r["tokens"] >= 6  # one sampled completion of each prompt, at least a token each
    # The same backend as sampler and trainer: not bit-exact, since mu comes from decode steps over
    # the KV cache and pi from one prefill of the whole sequence, whose float sums round otherwise
    # (measured: max 4.8e-7, mean 5e-8); nothing any correction acts on.
    assert fp32["max_abs_logprob_delta"] < 1e-5 and abs(fp32["mismatch_kl"]) < 1e-6
    assert fp32["tis_truncated"] == fp32["icepop_dropped"] == 0
    # bf16 and int8 weights sample from another distribution (measured: max delta 3e-3 and 5e-3);
    # k1 may come out of either sign on 48 tokens, its k3 companion is positive per token
    for r in (bf16, int8):
        assert r["max_abs_logprob_delta"] > 1e-3 and r["mismatch_k3"] > 1000 * fp32["mismatch_k3"] > 0
        assert abs(r["mismatch_kl"]) > 10 * abs(fp32["mismatch_kl"])
