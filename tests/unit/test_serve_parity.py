"""Parity metrics against hand-worked cases, and the thresholds that turn them into pass/fail."""

from keel.config import ParityConfig
from keel.export.parity import check, compare_greedy


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
