"""Trainer/sampler mismatch correction (keel/correction.py) against hand-computed numbers.

The shared batch sets the ratios r = pi_old / mu directly (log_ratio = log r); B = 2, T = 3 and the
last position of sequence 1 is padding with garbage in it:
  seq 0: r = 0.4, 1.5, 4.0   product 2.4 (> 2) but geometric mean 2.4^(1/3) = 1.339 (<= 2)
  seq 1: r = 4.5, 1.25, pad  product 5.625, geometric mean 5.625^(1/2) = 2.372 (> 2)
"""

import dataclasses
import math

import pytest
import torch

from keel.config import RLConfig, RolloutConfig, LoraSpec, from_dict
from keel.errors import KeelError
from keel.correction import correction_weights, mismatch_stats, resolve_correction

RATIOS = [[0.4, 1.5, 4.0], [4.5, 1.25, 1.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
REAL = [0.4, 1.5, 4.0, 4.5, 1.25]
LOG_PRODUCT = math.log(0.4 * 1.5 * 4.0 * 4.5 * 1.25)  # log 13.5 = 2.60269


def batch():
    log_ratio = torch.tensor(RATIOS, dtype=torch.float64).log()
    log_ratio[1, 2] = float("nan")  # padding garbage must never matter
    return log_ratio, torch.tensor(MASK)


def close(w, rows):
    return w.flatten().tolist() == pytest.approx(sum(rows, []), rel=1e-6)


def weights_and_stats(mode, **kw):
    log_ratio, mask = batch()
    w, corrected = correction_weights(log_ratio, mask, mode, **kw)
    real = mask.bool()
    return w, corrected, mismatch_stats(log_ratio[real], w[real], corrected[real])


def test_tis_truncates_at_the_cap():
    w, corrected, stats = weights_and_stats("tis")  # cap 2: min(r, 2)
    assert close(w, [[0.4, 1.5, 2.0], [2.0, 1.25, 0.0]])
    assert corrected.tolist() == [[False, False, True], [True, False, False]]
    assert stats["correction_share"] == pytest.approx(2 / 5)  # 4.0 and 4.5 truncated, of 5 real tokens
    # ESS: sum w = 0.4 + 1.5 + 2 + 2 + 1.25 = 7.15; sum w^2 = 0.16 + 2.25 + 4 + 4 + 1.5625 = 11.9725;
    # 7.15^2 / (5 * 11.9725) = 51.1225 / 59.8625 = 0.853999...
    assert stats["ess"] == pytest.approx(51.1225 / 59.8625, rel=1e-6)
    w3, _, _ = weights_and_stats("tis", cap=3.0)  # a larger cap truncates only 4.0 and 4.5, to 3
    assert close(w3, [[0.4, 1.5, 3.0], [3.0, 1.25, 0.0]])


def test_icepop_drops_tokens_outside_the_band():
    w, corrected, stats = weights_and_stats("icepop")  # keep r in [0.5, 5], weight r; else 0
    assert close(w, [[0.0, 1.5, 4.0], [4.5, 1.25, 0.0]])
    assert corrected.tolist() == [[True, False, False], [False, False, False]]
    assert stats["correction_share"] == pytest.approx(1 / 5)  # 0.4 < 0.5 dropped
    # sum w = 11.25; sum w^2 = 0 + 2.25 + 16 + 20.25 + 1.5625 = 40.0625; 11.25^2 / (5 * 40.0625)
    assert stats["ess"] == pytest.approx(126.5625 / 200.3125, rel=1e-6)
    w, _, _ = weights_and_stats("icepop", low=0.3, high=4.2)  # 0.4 now in, 4.5 out
    assert close(w, [[0.4, 1.5, 4.0], [0.0, 1.25, 0.0]])


def test_seq_mask_drops_whole_sequences_by_their_geometric_mean_ratio():
    w, corrected, stats = weights_and_stats("seq_mask")  # cap 2
    # seq 0: geometric mean 1.339 <= 2 kept (its product, 2.4, would have dropped it); seq 1: 2.372 > 2 dropped
    assert w.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    assert corrected.tolist() == [[False, False, False], [True, True, False]]
    assert stats["correction_share"] == pytest.approx(2 / 5)
    assert stats["ess"] == pytest.approx(9 / (5 * 3))  # (1+1+1)^2 / (5 * 3)
    w, _, _ = weights_and_stats("seq_mask", cap=2.5)  # 2.372 <= 2.5: both kept
    assert w.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def test_none_weighs_every_real_token_one():
    w, corrected, stats = weights_and_stats("none")
    assert w.tolist() == MASK and not corrected.any()
    assert stats["correction_share"] == 0.0 and stats["ess"] == 1.0


def test_mismatch_kl_k1_and_k3_hand_values():
    _, _, stats = weights_and_stats("tis")
    # k1: mean of log mu - log pi_old = -(sum log r) / 5 = -log(13.5) / 5 = -0.52054 (negative: noisy on 5 tokens)
    assert stats["mismatch_kl"] == pytest.approx(-LOG_PRODUCT / 5, rel=1e-9)
    # k3: mean of (r - 1 - log r) = (11.65 - 5 - log 13.5) / 5 = 0.80946 (>= 0 always)
    assert stats["mismatch_k3"] == pytest.approx((sum(REAL) - 5 - LOG_PRODUCT) / 5, rel=1e-9)


def test_equal_policies_give_weights_of_exactly_one_and_zero_mismatch():
    mask = torch.tensor(MASK)
    log_ratio = torch.zeros(2, 3)
    for mode in ("tis", "icepop", "seq_mask", "none"):
        w, corrected = correction_weights(log_ratio, mask, mode)
        assert torch.equal(w, mask) and not corrected.any(), mode
    stats = mismatch_stats(log_ratio[mask.bool()], mask[mask.bool()], torch.zeros(5, dtype=torch.bool))
    assert stats == {"mismatch_kl": 0.0, "mismatch_k3": 0.0, "correction_share": 0.0, "ess": 1.0}


def test_every_token_dropped_gives_ess_zero_not_nan():
    stats = mismatch_stats(torch.tensor([3.0, 3.0]), torch.zeros(2), torch.ones(2, dtype=torch.bool))
    assert stats["ess"] == 0.0 and stats["correction_share"] == 1.0


def test_auto_is_tis_unless_the_sampler_is_the_trainer():
    assert resolve_correction("auto", sampler_is_trainer=True) == "none"
    assert resolve_correction("auto", sampler_is_trainer=False) == "tis"
    assert resolve_correction("icepop", sampler_is_trainer=True) == "icepop"


def test_auto_is_tis_when_the_sampler_runs_a_step_behind():
    # async_steps 1: the same computation, but on the weights before the last update: off-policy
    assert resolve_correction("auto", sampler_is_trainer=True, async_steps=1) == "tis"
    assert resolve_correction("none", sampler_is_trainer=True, async_steps=1) == "none"
    for data in ({"async_steps": 2}, {"async_steps": -1}):
        with pytest.raises(KeelError) as e:
            from_dict(RLConfig, data)
        assert e.value.field == "async_steps", data
    assert RLConfig().async_steps == 0


def test_config_validates_correction_and_rollout():
    cfg = from_dict(RLConfig, {"rollout": {"backend": "onnxruntime"}, "correction": "icepop", "icepop_low": 0.4})
    assert cfg.rollout == RolloutConfig(backend="onnxruntime") and cfg.correction == "icepop"
    assert RLConfig().rollout is None and RLConfig().correction == "auto"  # default: today's path
    bad = [({"correction": "is"}, "correction"), ({"correction_cap": 0.5}, "correction_cap"),
           ({"icepop_low": 1.5}, "icepop_low"), ({"rollout": {"backend": "tensorrt"}}, "rollout.backend"),
           ({"rollout": {"backend": "onnxruntime", "dtype": "bf16"}}, "rollout.dtype"),
           ({"rollout": {"backend": "onnxruntime", "device": "cuda"}}, "rollout.device")]
    for data, field in bad:
        with pytest.raises(KeelError) as e:
            from_dict(RLConfig, data)
        assert e.value.field == field, data
    # A rollout backend with LoRA samples the merged weights (tests/integration/test_rollout_backends.py).
    assert dataclasses.replace(RLConfig(), rollout=RolloutConfig(), lora=LoraSpec()).lora == LoraSpec()
