"""Parity metrics against hand-worked cases, and the thresholds that turn them into pass/fail."""

import math

import pytest
import torch

from keel.config import ParityConfig
from keel.errors import KeelError
from keel.export.parity import NO_LOGITS, check, compare_greedy, format_table, rollout_mismatch, run_parity


def test_compare_greedy_by_hand():
    ref = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1]]
    cand = [[1, 2, 3], [4, 9, 6], [7, 8, 2], [1, 1]]
    # per step top-3 ids of each side; only the divergence steps matter
    ref_topk = [[[1], [2], [3]], [[4], [5, 9, 0], [6]], [[7], [8], [9, 0, 1]], [[1], [1]]]
    cand_topk = [[[1], [2], [3]], [[4], [9, 5, 0], [6]], [[7], [8], [2, 0, 1]], [[1], [1]]]
    r = compare_greedy(ref, ref_topk, cand, cand_topk)
    assert r["greedy_match"] == 0.5 and r["diverged"] == 2
    assert r["first_divergence_min"] == 1 and r["first_divergence_median"] == 1.5
    # prompt 2 diverges at step 1 with each token in the other's top-k; prompt 3 at step 2 with
    # the candidate's 2 outside the reference's top-k {9, 0, 1}
    assert r["topk_containment"] == 0.5


def test_identical_runs_and_early_stop():
    assert compare_greedy([[1, 2]], [[[1], [2]]], [[1, 2]], [[[1], [2]]])["topk_containment"] == 1.0
    r = compare_greedy([[1, 2, 0]], [[[1], [2], [0]]], [[1, 2]], [[[1], [2]]])
    assert r["first_divergence_min"] == 2 and r["topk_containment"] == 0.0


def test_thresholds():
    row = {"greedy_match": 0.98, "max_abs_logit_delta": 2e-3, "topk_containment": 1.0, "accuracy": 0.70,
           "accuracy_drop": 0.03}
    result = {"candidates": {"onnxruntime:cpu:fp32": dict(row), "torch:cpu:bf16": dict(row)}}
    fails = check(result, "torch:cpu:fp32", ParityConfig())
    # fp32 candidate: match, logit delta and accuracy; bf16 only accuracy (a different dtype may diverge)
    assert sum(f.startswith("onnxruntime") for f in fails) == 3
    assert [f for f in fails if f.startswith("torch")] == [
        "torch:cpu:bf16: accuracy 0.700 trails the reference by 0.030 > 0.02"]
    assert check(result, "torch:cpu:fp32", ParityConfig(min_match_same_dtype=0.9, max_logit_delta_same_dtype=1e-2,
                                                         max_accuracy_drop=0.05)) == []


def test_rollout_mismatch_by_hand():
    """Five tokens with sampler probabilities mu and reference probabilities pi; r = pi / mu is
    1, 2.4, 0.25, 7 and 4."""
    mu, pi = [0.5, 0.25, 0.8, 0.1, 0.2], [0.5, 0.6, 0.2, 0.7, 0.8]
    r = rollout_mismatch(torch.tensor(mu).log(), torch.tensor(pi).log(), cap=2.0, low=0.5, high=5.0)
    # k1: mean of -log r = -(0 + ln 2.4 + ln 0.25 + ln 7 + ln 4) / 5 = -(0.87547 - 1.38629 + 1.94591 + 1.38629) / 5
    assert r["mismatch_kl"] == pytest.approx(-2.821379 / 5, abs=1e-6)
    # k3: mean of r - 1 - ln r = (0 + 0.52453 + 0.63629 + 4.05409 + 1.61371) / 5
    assert r["mismatch_k3"] == pytest.approx(6.828621 / 5, abs=1e-6)
    assert r["max_abs_logprob_delta"] == pytest.approx(math.log(7), abs=1e-6)
    assert r["tis_truncated"] == pytest.approx(3 / 5)   # 2.4, 7 and 4 exceed the cap 2
    assert r["icepop_dropped"] == pytest.approx(2 / 5)  # 0.25 and 7 leave [0.5, 5]; 4 stays
    assert r["tokens"] == 5
    same = rollout_mismatch(torch.tensor(mu).log(), torch.tensor(mu).log(), cap=2.0, low=0.5, high=5.0)
    assert same["mismatch_kl"] == same["max_abs_logprob_delta"] == same["tis_truncated"] == 0.0


def test_a_sampler_without_logits_skips_the_logit_threshold_and_shows_a_dash():
    row = {"greedy_match": 1.0, "max_abs_logit_delta": None, "topk_containment": 1.0, "accuracy": 0.5,
           "accuracy_drop": 0.0, "first_divergence_min": None, "first_divergence_median": None,
           "tokens_per_s": 100.0, "mismatch_kl": 1e-8, "max_abs_logprob_delta": 4e-7, "tis_truncated": 0.0,
           "icepop_dropped": 0.0, "not_measured": {"max_abs_logit_delta": NO_LOGITS}}
    result = {"reference": {"backend": "torch:cpu:fp32", "accuracy": 0.5, "tokens_per_s": 100.0}, "n": 2,
              "max_new_tokens": 4, "task": "arithmetic", "top_k": 5, "candidates": {"vllm:cpu:fp32": row}}
    assert check(result, "torch:cpu:fp32", ParityConfig(max_logit_delta_same_dtype=0.0)) == []
    table = format_table(result)
    line = next(x for x in table.splitlines() if x.startswith("vllm:cpu:fp32"))
    assert line.split()[1:3] == ["-", "100.0%"] and "1.00e-08" in line and "4.00e-07" in line
    assert f"vllm:cpu:fp32: max_abs_logit_delta not measured ({NO_LOGITS})" in table


def test_a_vllm_reference_is_refused_before_anything_loads(tmp_path):
    """The reference scores every candidate's samples teacher-forced, which needs its logits."""
    with pytest.raises(KeelError, match="the reference vllm:cpu returns no logits") as e:
        run_parity(tmp_path / "no-model", "vllm:cpu", ["torch:cpu:fp32"], tmp_path / "out")
    assert e.value.field == "reference" and not (tmp_path / "out").exists()
