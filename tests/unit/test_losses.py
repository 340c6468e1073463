"""Loss math against hand-computed numbers. Ratios are set directly: old_logp = 0, logp = log(ratio)."""

import math

import pytest
import torch

from keel.errors import KeelError
from keel.logprobs import entropy_BT, token_logprobs
import copy
import dataclasses

from keel.config import LOSSES, RLConfig, RolloutConfig, get_loss
from keel.engine.sampler import completion_logprobs
from keel.models import init_model, special_ids
from keel.rl.advantages import group_advantages
from keel.correction import correction_weights
from keel.rl.trainer import Batch, RLTrainer
from keel.rl.losses import batch_units, policy_loss, rows_with_gradient

def spec(kind: str, eps_low: float, eps_high: float):
    """Loss `kind` as published, with the given clip range."""
    return dataclasses.replace(get_loss(kind), eps_low=eps_low, eps_high=eps_high)


PAD = 123.0  # garbage in padded positions; must never matter

# The shared batch: B=2, T=3, the last position of sequence 1 is padding.
#   seq 0, A = +1: ratios 1.1 (inside the band), 1.5 (above, A > 0: clipped), 0.5 (below, A > 0: NOT clipped)
#   seq 1, A = -1: ratios 0.5 (below, A < 0: clipped), 1.5 (above, A < 0: NOT clipped), pad
RATIOS = [[1.1, 1.5, 0.5], [0.5, 1.5, 1.0]]
ADV = [1.0, -1.0]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def make_batch(pad_logp=PAD, pad_old=-PAD):
    logp = torch.tensor(RATIOS, dtype=torch.float64).log()
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp[1, 2], old[1, 2] = pad_logp, pad_old
    return logp.requires_grad_(), old, torch.tensor(ADV), torch.tensor(MASK)


# Per-token losses -min(r A, clip(r) A) of the shared batch with eps = (0.2, 0.2):
SEQ0 = [-1.1, -1.2, -0.5]  # -min(1.1, 1.1), -min(1.5, 1.2), -min(0.5, 0.8)
SEQ1 = [0.8, 1.5]  # -min(-0.5, -0.8), -min(-1.5, -1.2)


# The papers' clip ranges: DeepSeekMath (GRPO), Dr. GRPO, DAPO (clip-higher), GSPO.
PUBLISHED_CLIP = {"grpo": (0.2, 0.2), "dr_grpo": (0.2, 0.2), "dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4)}


@pytest.mark.parametrize("kind", PUBLISHED_CLIP)
def test_published_default_clip_ranges_are_the_ones_the_loss_applies(kind):
    """Not the config restated: ratios 1% inside and 1% outside each published bound, with the
    advantage pushing against it, go through the loss as `get_loss` gives it; exactly the two
    outside are clipped. (One-token sequences: GSPO's sequence ratio is the token's.)"""
    low, high = PUBLISHED_CLIP[kind]
    ratios = torch.tensor([[1 + 0.99 * high], [1 + 1.01 * high], [1 - 0.99 * low], [1 - 1.01 * low]], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = policy_loss(ratios.log(), torch.zeros(4, 1, dtype=torch.float64), adv, torch.ones(4, 1),
                              spec=get_loss(kind), norm_len=1)
    assert stats["clip_frac"] == pytest.approx(2 / 4)
    # per sequence -min(r A, clip(r) A): -r, -(1 + high), r, 1 - low; every normaliser is 1 token here
    per_seq = [-(1 + 0.99 * high), -(1 + high), 1 - 0.99 * low, 1 - low]
    assert loss.item() == pytest.approx(sum(per_seq) / 4, rel=1e-12)
    assert set(LOSSES) == set(PUBLISHED_CLIP)


def test_grpo_hand_value_and_stats():
    logp, old, adv, mask = make_batch()
    loss, stats = policy_loss(logp, old, adv, mask, spec=spec("grpo", 0.2, 0.2))
    # mean over each sequence's own tokens, then over the 2 sequences
    expected = ((-1.1 - 1.2 - 0.5) / 3 + (0.8 + 1.5) / 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert stats["clip_frac"] == pytest.approx(2 / 5)  # tokens (0,1) and (1,0) of 5 real tokens
    assert stats["ratio_mean"] == pytest.approx((1.1 + 1.5 + 0.5 + 0.5 + 1.5) / 5)
    assert stats["kl"] == 0.0
    assert all(isinstance(v, float) for v in stats.values())


def test_normalisers_differ_and_match_hand_values():
    total = sum(SEQ0) + sum(SEQ1)  # -0.5
    hand = {
        "grpo": (sum(SEQ0) / 3 + sum(SEQ1) / 2) / 2,  # 0.10833
        "dapo": total / 5,  # over the 5 real tokens: -0.1
        "dr_grpo": total / (2 * 4),  # over B * norm_len with norm_len 4: -0.0625
    }
    got = {}
    for kind, expected in hand.items():
        logp, old, adv, mask = make_batch()
        loss, _ = policy_loss(logp, old, adv, mask, spec=spec(kind, 0.2, 0.2), norm_len=4)
        got[kind] = loss.item()
        assert got[kind] == pytest.approx(expected, rel=1e-9), kind
    assert len({round(v, 6) for v in got.values()}) == 3


def test_dapo_clip_higher_default():
    logp, old, adv, mask = make_batch()
    loss, stats = policy_loss(logp, old, adv, mask, spec=get_loss("dapo"))  # as published, not restated
    # only the clipped-above token changes: -min(1.5, 1.28); ratio 1.5 with A < 0 stays unclipped
    expected = (-1.1 - 1.28 - 0.5 + 0.8 + 1.5) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert stats["clip_frac"] == pytest.approx(2 / 5)


def test_gradient_is_zero_on_clipped_tokens_and_hand_value_elsewhere():
    logp, old, adv, mask = make_batch()
    loss, _ = policy_loss(logp, old, adv, mask, spec=spec("grpo", 0.2, 0.2))
    loss.backward()
    # d(-r A)/d logp = -A r (since r = exp(logp - old)), divided by len_i and by B = 2
    expected = [
        [-1 * 1.1 / (3 * 2), 0.0, -1 * 0.5 / (3 * 2)],  # 1.5 with A > 0 clipped: no gradient
        [0.0, -(-1) * 1.5 / (2 * 2), 0.0],  # 0.5 with A < 0 clipped; padding: no gradient
    ]
    assert logp.grad.tolist()[0] == pytest.approx(expected[0], abs=1e-12)
    assert logp.grad.tolist()[1] == pytest.approx(expected[1], abs=1e-12)


def test_gradient_at_ratio_one_is_minus_adv_over_length():
    logp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    adv, mask = torch.tensor([2.0, -0.5]), torch.tensor(MASK)
    hand = {  # gradient per real token at ratio 1: -A_i / normaliser
        "grpo": [-2.0 / (3 * 2), 0.5 / (2 * 2)],  # -A / len_i, then the mean over B = 2 sequences
        "dapo": [-2.0 / 5, 0.5 / 5],  # -A / (all real tokens)
        "dr_grpo": [-2.0 / (2 * 8), 0.5 / (2 * 8)],  # -A / (B * norm_len), norm_len 8
    }
    for kind, (g0, g1) in hand.items():
        logp.grad = None
        loss, stats = policy_loss(logp, logp.detach(), adv, mask, spec=spec(kind, 0.2, 0.2), norm_len=8)
        loss.backward()
        want = torch.tensor([[g0, g0, g0], [g1, g1, 0.0]], dtype=torch.float64)
        torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-12, msg=kind)
        assert stats["clip_frac"] == 0.0
        assert stats["ratio_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_padded_values_do_not_matter(kind):
    results = []
    for pad_logp, pad_old in [(PAD, -PAD), (0.0, 0.0), (float("nan"), float("inf"))]:
        logp, old, adv, mask = make_batch(pad_logp, pad_old)
        eps_low, eps_high = LOSSES[kind].eps_low, LOSSES[kind].eps_high
        loss, stats = policy_loss(
            logp, old, adv, mask, spec=spec(kind, eps_low, eps_high), norm_len=4, ref_logp_BT=old, beta=0.1
        )
        loss.backward()
        assert torch.isfinite(logp.grad).all()
        assert logp.grad[1, 2].item() == 0.0
        results.append((loss.item(), stats["clip_frac"], stats["ratio_mean"], logp.grad[:, :2].tolist()))
    assert results[1:] == [results[0]] * 2  # bit-identical: padded positions are selected away, not scaled


def test_gspo_sequence_ratio_is_geometric_mean():
    logp, old, adv, mask = make_batch()
    loss, stats = policy_loss(logp, old, adv, mask, spec=spec("gspo", 3e-4, 4e-4))
    s0 = (1.1 * 1.5 * 0.5) ** (1 / 3)  # 0.938 < 1 - 3e-4 but A > 0: unclipped, loss -s0
    s1 = (0.5 * 1.5) ** (1 / 2)  # 0.866 < 1 - 3e-4 and A < 0: clipped, loss -min(-s1, -(1 - 3e-4))
    expected = (-s0 + (1 - 3e-4)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert stats["clip_frac"] == pytest.approx(1 / 2)  # a fraction of sequences, not tokens
    assert stats["ratio_mean"] == pytest.approx((s0 + s1) / 2)
    loss.backward()
    # d s0 / d logp_t = s0 / len_0: every token of sequence 0 gets -A s0 / (3 * B); sequence 1 is clipped
    g0 = -1 * s0 / (3 * 2)
    want = torch.tensor([[g0, g0, g0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-12)


def test_gspo_clip_boundaries():
    # Each sequence has token ratios (s * 1.5, s / 1.5): far outside any band per token, but the
    # geometric mean is s. Bounds: 1 - 3e-4 = 0.9997 and 1 + 4e-4 = 1.0004.
    s = torch.tensor([1.0003, 1.0006, 0.9998, 0.9995], dtype=torch.float64)
    logp = torch.stack([(s * 1.5).log(), (s / 1.5).log()], dim=1)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = policy_loss(
        logp, torch.zeros_like(logp), adv, torch.ones(4, 2), spec=spec("gspo", 3e-4, 4e-4)
    )
    expected = (
        -1.0003  # inside the band
        - 1.0004  # 1.0006 > 1.0004 with A > 0: clipped
        + 0.9998  # inside the band
        + 0.9997  # 0.9995 < 0.9997 with A < 0: clipped
    ) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert stats["clip_frac"] == pytest.approx(2 / 4)
    # the same tokens under token-level grpo clip every token at eps 0.2 (ratios 1.5 and 0.667)
    _, token_stats = policy_loss(
        logp, torch.zeros_like(logp), adv, torch.ones(4, 2), spec=spec("grpo", 0.2, 0.2)
    )
    assert token_stats["clip_frac"] == pytest.approx(4 / 8)  # 1.5 with A > 0, 0.667 with A < 0


# k3 values for d = ref - logp: exp(d) - d - 1
K3_LOG2 = 2 - math.log(2) - 1  # d = log 2: 0.3069
K3_MINUS_LOG2 = 0.5 + math.log(2) - 1  # d = -log 2: 0.1931


def _kl_batch():
    logp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(2), -math.log(2), 0.0], [math.log(2), 0.0, PAD]], dtype=torch.float64)
    return logp, ref, torch.zeros(2), torch.tensor(MASK)  # A = 0: the surrogate term is exactly 0


def test_k3_kl_hand_values():
    seq0 = (K3_LOG2 + K3_MINUS_LOG2 + 0.0) / 3
    seq1 = (K3_LOG2 + 0.0) / 2
    all_tokens = (K3_LOG2 + K3_MINUS_LOG2 + K3_LOG2) / 5
    hand = {
        "grpo": 0.1 * (seq0 + seq1) / 2,
        "gspo": 0.1 * (seq0 + seq1) / 2,  # per-sequence mean, then mean over sequences
        "dapo": 0.1 * all_tokens,
    }
    for kind, expected in hand.items():
        logp, ref, adv, mask = _kl_batch()
        loss, stats = policy_loss(
            logp, logp.detach(), adv, mask, spec=spec(kind, 0.2, 0.2), ref_logp_BT=ref, beta=0.1
        )
        assert loss.item() == pytest.approx(expected, rel=1e-9), kind
        assert stats["kl"] == pytest.approx(all_tokens, rel=1e-9)
    # gradient of beta * k3 w.r.t. logp: beta * (1 - exp(ref - logp)), through the grpo mean
    logp, ref, adv, mask = _kl_batch()
    loss, _ = policy_loss(
        logp, logp.detach(), adv, mask, spec=spec("grpo", 0.2, 0.2), ref_logp_BT=ref, beta=0.1
    )
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(0.1 * (1 - 2) / (3 * 2))
    assert logp.grad[0, 1].item() == pytest.approx(0.1 * (1 - 0.5) / (3 * 2))
    assert logp.grad[1, 2].item() == 0.0


def test_kl_is_zero_when_reference_equals_policy():
    logp, old, adv, mask = make_batch()
    base, _ = policy_loss(logp, old, adv, mask, spec=spec("grpo", 0.2, 0.2))
    loss, stats = policy_loss(
        logp, old, adv, mask, spec=spec("grpo", 0.2, 0.2), ref_logp_BT=logp.detach(), beta=0.5
    )
    assert stats["kl"] == 0.0
    assert loss.item() == base.item()


def test_kl_without_reference_is_a_user_error():
    logp, old, adv, mask = make_batch()
    with pytest.raises(KeelError, match="ref_logp_BT"):
        policy_loss(logp, old, adv, mask, spec=spec("grpo", 0.2, 0.2), beta=0.1)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_sequence_without_tokens_gives_no_nan(kind):
    logp, old, adv, _ = make_batch()
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    eps_low, eps_high = (0.2, 0.2) if kind != "gspo" else (LOSSES["gspo"].eps_low, LOSSES["gspo"].eps_high)
    loss, stats = policy_loss(logp, old, adv, mask, spec=spec(kind, eps_low, eps_high), norm_len=4)
    loss.backward()
    hand = {
        "grpo": (sum(SEQ0) / 3 + 0.0) / 2,  # the empty sequence still counts in the mean over B
        "dapo": sum(SEQ0) / 3,
        "dr_grpo": sum(SEQ0) / (2 * 4),
        "gspo": (-((1.1 * 1.5 * 0.5) ** (1 / 3)) + 0.0) / 2,
    }
    assert loss.item() == pytest.approx(hand[kind], rel=1e-9)
    assert logp.grad[1].tolist() == [0.0, 0.0, 0.0]
    assert all(math.isfinite(v) for v in stats.values())
    # a batch without any real token: zero loss, not NaN
    loss, stats = policy_loss(logp, old, adv, torch.zeros(2, 3), spec=spec(kind, 0.2, 0.2), norm_len=4)
    assert loss.item() == 0.0 and stats["clip_frac"] == 0.0


def test_unknown_kind_and_missing_norm_len():
    logp, old, adv, mask = make_batch()
    with pytest.raises(KeelError, match="grpo, dr_grpo, dapo, gspo"):
        policy_loss(logp, old, adv, mask, spec=spec("ppo", 0.2, 0.2))
    with pytest.raises(KeelError, match="norm_len"):
        policy_loss(logp, old, adv, mask, spec=spec("dr_grpo", 0.2, 0.2))


def test_token_logprobs_hand_values_and_temperature():
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])  # p = (1/4, 3/4)
    tokens = torch.tensor([[1, 0]])
    assert token_logprobs(logits, tokens).tolist()[0] == pytest.approx([math.log(3 / 4), math.log(1 / 4)], rel=1e-6)
    # temperature 2 halves the logits: weights 1 and sqrt(3)
    r3 = math.sqrt(3)
    assert token_logprobs(logits, tokens, temperature=2.0).tolist()[0] == pytest.approx(
        [math.log(r3 / (1 + r3)), math.log(1 / (1 + r3))], rel=1e-6
    )
    with pytest.raises(KeelError, match="temperature"):
        token_logprobs(logits, tokens, temperature=0.0)


def test_token_logprobs_match_log_softmax_gather_in_fp32():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=gen) * 4).to(torch.bfloat16).requires_grad_()
    tokens = torch.randint(0, 11, (3, 5), generator=gen)
    got = token_logprobs(logits, tokens, temperature=0.7)
    want = torch.log_softmax(logits.detach().float() / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)
    got.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum().item() > 0


def test_entropy():
    uniform = torch.full((2, 3, 7), 1.5, dtype=torch.bfloat16)
    ent = entropy_BT(uniform)
    assert ent.dtype == torch.float32 and ent.shape == (2, 3)
    assert ent.flatten().tolist() == pytest.approx([math.log(7)] * 6, rel=1e-6)
    two = torch.tensor([[[0.0, math.log(3)]]])  # p = (1/4, 3/4)
    assert entropy_BT(two).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-6)


# ---- off-policy correction weights (keel/correction.py) ------------------------------------


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_correction_weights_of_exactly_one_change_nothing(kind):
    results = []
    for weight in (None, torch.ones(2, 3, dtype=torch.float64)):
        logp, old, adv, mask = make_batch()
        eps_low, eps_high = LOSSES[kind].eps_low, LOSSES[kind].eps_high
        loss, stats = policy_loss(logp, old, adv, mask, spec=spec(kind, eps_low, eps_high), norm_len=4,
                                  ref_logp_BT=old, beta=0.1, is_weight_BT=weight)
        loss.backward()
        results.append((loss.item(), stats, logp.grad.tolist()))
    assert results[1] == results[0]  # bit for bit, gradient included


def test_correction_weights_scale_each_token_and_keep_the_normaliser():
    logp, old, adv, mask = make_batch()
    weight = torch.tensor([[0.5, 2.0, 1.0], [0.0, 1.0, 7.0]], dtype=torch.float64)  # 7.0 sits on padding
    loss, _ = policy_loss(logp, old, adv, mask, spec=spec("grpo", 0.2, 0.2), is_weight_BT=weight)
    # seq 0: (-1.1 * 0.5 - 1.2 * 2 - 0.5 * 1) / 3 = -3.45 / 3 = -1.15; seq 1: (0.8 * 0 + 1.5 * 1) / 2 = 0.75
    # (the dropped token still counts in its sequence's length); mean over 2 sequences: -0.2
    assert loss.item() == pytest.approx((-1.15 + 0.75) / 2, rel=1e-9)
    loss.backward()
    # d/dlogp of -w r A is -w A r; divided by len_i and B = 2. Token (0,1) is clipped (no gradient);
    # token (1,0) is clipped too; token (1,1) has weight 1: -(-1) * 1.5 / 4.
    assert logp.grad.tolist()[0] == pytest.approx([-0.5 * 1.1 / 6, 0.0, -1 * 0.5 / 6], abs=1e-12)
    assert logp.grad.tolist()[1] == pytest.approx([0.0, 1.5 / 4, 0.0], abs=1e-12)


# ---- skipping rows without gradient (rows_with_gradient) --------------------------------------


def test_rows_with_gradient_are_those_with_nonzero_advantage_unless_a_kl_term_needs_all():
    adv = torch.tensor([0.0, 0.7, -0.0, -1e-30, 0.0])
    assert rows_with_gradient(adv, beta=0.0) == [1, 3]  # exactly zero only: a tiny advantage still trains
    assert rows_with_gradient(adv, beta=0.01) == [0, 1, 2, 3, 4]
    assert rows_with_gradient(torch.zeros(3), beta=0.0) == []


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_a_zero_advantage_row_has_exactly_zero_gradient_whatever_its_ratios_and_weights(kind):
    """The shared batch with sequence 1's advantage set to 0 (its ratios 0.5 and 1.5 sit outside the
    clip band, its correction weights are arbitrary): its loss and gradient are exactly 0, and
    sequence 0's are unchanged by it, so dropping the row while counting it keeps the loss."""
    logp, old, _, mask = make_batch()
    adv = torch.tensor([1.0, 0.0])
    weight = torch.tensor([[0.5, 2.0, 1.0], [3.0, 0.25, 7.0]], dtype=torch.float64)
    s = spec(kind, 0.2, 0.2)
    loss, _ = policy_loss(logp, old, adv, mask, spec=s, norm_len=4, is_weight_BT=weight)
    loss.backward()
    assert logp.grad[1].tolist() == [0.0, 0.0, 0.0]
    # Sequence 0 alone, weighed by its share of the units (1 of 2 sequences, or 3 of 5 tokens):
    alone = logp.detach()[:1].clone().requires_grad_()
    part, _ = policy_loss(alone, old[:1], adv[:1], mask[:1], spec=s, norm_len=4, is_weight_BT=weight[:1])
    share = batch_units(s, [3]) / batch_units(s, [3, 2])
    (part * share).backward()
    assert (part * share).item() == pytest.approx(loss.item(), rel=1e-12)
    assert alone.grad[0].tolist() == pytest.approx(logp.grad[0].tolist(), rel=1e-12, abs=1e-15)


class GradientTap:
    """An injector that fires no fault and keeps each update's gradients (after the ranks' average,
    before clipping and the optimizer step)."""

    def __init__(self):
        self.grads = []

    def loss_scale(self, step):
        return 1.0

    def before_update(self, step, model):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def hand_batch(tokenizer, seed=0):
    """3 groups of 4 with random completions: groups 0 and 2 all rewarded alike (zero advantage),
    group 1 mixed; the sampler's log-probs are made up (the correction weighs the loss)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 60, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(3) for _ in range(4)]
    prompts = [prompts[4 * (i // 4)] for i in range(12)]  # a group shares its prompt
    completions = [torch.randint(10, 60, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(12)]
    rewards = torch.tensor([1.0] * 4 + [1.0, 0.0, 0.0, 1.1] + [0.0] * 4)
    logprobs = [(-torch.rand(len(c), generator=g) * 3).tolist() for c in completions]
    return Batch(prompts, completions, rewards, rewards, torch.zeros(12), torch.ones(12, dtype=torch.bool), 12,
                 logprobs)


@pytest.mark.parametrize("micro_batch_tokens", [16384, 40])
@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_skipping_zero_advantage_rows_keeps_the_loss_and_gradient_of_the_whole_batch(kind, micro_batch_tokens):
    """The trainer skips groups 0 and 2 (zero advantage, beta 0); its loss, gradient and clip_frac
    equal the whole batch's, computed here in one forward with the same TIS correction."""
    torch.manual_seed(0)
    model, tok = init_model("qwen3", layers=2, hidden=64, seed=0)
    cfg = RLConfig(loss=kind, group_size=4, prompts_per_step=3, beta=0.0, max_new_tokens=12, seed=0,
                   micro_batch_tokens=micro_batch_tokens, rollout=RolloutConfig(dtype="bf16"), device="cpu")
    trainer = RLTrainer(copy.deepcopy(model), tok, cfg)
    batch, tap = hand_batch(tok), GradientTap()
    row = trainer.update(batch, tap)
    assert row["rows_skipped"] == 8 / 12 and trainer.correction == "tis"

    _, pad_id = special_ids(tok)
    logp, mask, _ = completion_logprobs(model, batch.prompts, batch.completions, pad_id=pad_id)
    old = logp.detach()
    weight, _ = correction_weights(old - batch.sampling_logprobs("cpu"), mask, "tis")
    adv = group_advantages(batch.rewards_B, 4, scale_by_std=cfg.loss_spec.scale_by_std)
    assert (adv[:4] == 0).all() and (adv[8:] == 0).all() and (adv[4:8] != 0).all()
    loss, stats = policy_loss(logp, old, adv, mask, spec=cfg.loss_spec, norm_len=12, is_weight_BT=weight)
    loss.backward()
    assert row["loss"] == pytest.approx(loss.item(), rel=1e-6, abs=1e-9)
    assert row["clip_frac"] == pytest.approx(stats["clip_frac"], abs=1e-9)
    (got,) = tap.grads
    want = {n: p.grad for n, p in model.named_parameters()}
    assert got.keys() == want.keys()
    scale = max(g.abs().max().item() for g in want.values())
    assert scale > 1e-4  # the mixed group trains
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= 1e-6 * max(1.0, scale), name


def test_a_batch_without_any_gradient_still_steps_the_optimizer_on_zero_gradients():
    """Every row skipped: each parameter gets a zero gradient (not none), so AdamW moves it by its
    momentum and weight decay as for the unskipped batch, and a DDP rank takes part in the average."""
    model, tok = init_model("qwen3", layers=2, hidden=64, seed=0)
    trainer = RLTrainer(model, tok, RLConfig(group_size=4, prompts_per_step=2, beta=0.0, device="cpu"))
    calls = []  # the collectives a DDP rank runs in an update: its loss share, then the gradient average
    share, grads = trainer.sync.share, trainer.sync.grads
    trainer.sync.share = lambda n: calls.append(("share", n)) or share(n)
    trainer.sync.grads = lambda: calls.append(("grads", all(p.grad is not None for p in model.parameters()))) or grads()
    batch, tap = hand_batch(tok).subset(list(range(4)) + list(range(8, 12))), GradientTap()
    row = trainer.update(batch, tap)
    assert calls == [("share", 8.0), ("grads", True)]  # counted in the global batch's units, gradients for all
    assert row["rows_skipped"] == 1.0 and row["loss"] == 0.0 and row["grad_norm"] == 0.0
    params = dict(model.named_parameters())
    assert tap.grads[0].keys() == params.keys() and all((g == 0).all() for g in tap.grads[0].values())
    assert all(trainer.optimizer.state[p]["step"] == 1 for p in params.values())


def test_a_rank_short_of_passes_runs_zero_weight_stand_ins_that_change_nothing():
    """`Sync.passes` is how many forward and backward passes every rank runs (under fsdp the busiest
    rank's count). A rank with fewer micro-batches runs the rest on stand-in rows at zero weight,
    the last pass last; its gradient is exactly that of its own micro-batches. A rank without data
    runs stand-ins only, on zero gradients, and still steps."""
    model, tok = init_model("qwen3", layers=2, hidden=64, seed=0)
    cfg = RLConfig(group_size=4, prompts_per_step=3, beta=0.0, micro_batch_tokens=40, device="cpu")
    empty = torch.zeros(0)
    for batch in (hand_batch(tok), Batch([], [], empty, empty, empty, empty.bool(), 8, [])):
        grads, runs = [], []
        for extra in (0, 2):
            trainer = RLTrainer(copy.deepcopy(model), tok, cfg)
            passes, run = trainer.sync.passes, trainer.sync.run
            trainer.sync.passes = lambda n: passes(n) + extra  # as if another rank had 2 micro-batches more
            trainer.sync.run = lambda fn, last=True: runs.append((extra, last)) or run(fn, last)
            tap = GradientTap()
            row = trainer.update(batch, tap)
            grads.append(tap.grads[0])
            assert all(trainer.optimizer.state[p]["step"] == 1 for p in trainer.model.parameters())
        own = max(1, len(batch.subset(list(range(4, 8))).micro_batches(40))) if batch.completions else 1
        assert [last for e, last in runs if e == 0] == [False] * (own - 1) + [True]
        assert [last for e, last in runs if e == 2] == [False] * (own + 1) + [True]
        assert grads[0].keys() == grads[1].keys() == dict(model.named_parameters()).keys()
        assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
        if not batch.completions:
            assert row == {"grad_norm": 0.0, "tokens": 0} and all((g == 0).all() for g in grads[1].values())
        else:
            assert max(g.abs().max().item() for g in grads[1].values()) > 1e-4
